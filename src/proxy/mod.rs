//! The proxy role (ARCHITECTURE §5, §8): routes HTTP by `Host` from a local cache that follows
//! the store, forwards to upstreams, registers itself, drains without dropping requests.
//!
//! Single-node (`storage.type: memory`): no Redis; mappings come from the file's `mappings:`.

mod acme;
mod admin;
pub mod cache;
mod connect;
mod deadline;
mod drain;
mod error;
mod forward;
mod freshness;
pub(crate) mod h1;
mod limits;
pub mod metrics;
mod policy;
mod registry;
pub mod route;
pub(crate) mod seed;
mod server;
mod sets;
mod stats;
mod sync;
mod tls;
mod tunnel;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, combinators::BoxBody};
use tokio::sync::watch;

pub use admin::{MAX_DRAIN_WAIT, parse_wait as parse_drain_wait};
pub use error::ProxyError;

use crate::config::Settings;
use crate::observe::admin::{self as admin_server, Health};
use crate::store::StoreError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy hands to hyper: streamed from a client or an upstream, or its own.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Header pairs from text, for tests of header rewriting.
#[cfg(test)]
pub(crate) fn header_pairs(pairs: &[(&str, &str)]) -> Vec<(http::HeaderName, http::HeaderValue)> {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                http::HeaderValue::from_str(v).expect("header value"),
            )
        })
        .collect()
}

pub(crate) fn empty_body() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("mapping store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr} ({field}): {source}")]
    Bind {
        field: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn node_id(settings: &Settings) -> String {
    settings
        .config
        .proxy
        .node_id
        .clone()
        .unwrap_or_else(crate::observe::default_identity)
}

/// The address peers reach this node on.
fn advertise_address(settings: &Settings, listen: SocketAddr) -> String {
    if let Some(a) = &settings.config.proxy.advertise_address {
        return a.clone();
    }
    match std::env::var("POD_IP") {
        Ok(ip) if !ip.is_empty() => {
            SocketAddr::new(ip.parse().unwrap_or(listen.ip()), listen.port()).to_string()
        }
        _ => listen.to_string(),
    }
}

/// `egress` plus what this process listens on: its listeners (as bound) and the address peers
/// reach it on are never targets, whatever `egress.allow` says.
fn egress_policy(
    settings: &Settings,
    listen: SocketAddr,
    admin: SocketAddr,
    others: &[Option<SocketAddr>],
) -> crate::domain::EgressPolicy {
    let mut own = vec![listen, admin];
    own.extend(others.iter().flatten());
    if let Ok(a) = advertise_address(settings, listen).parse::<SocketAddr>() {
        own.push(a);
    }
    let pod_ip = std::env::var("POD_IP")
        .ok()
        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
    settings.egress.clone().with_own_listeners(own, pod_ip)
}

/// Connects to the store, retrying while it is unreachable (the admin server already answers,
/// not ready). A configuration the store refuses (e.g. a wrong password) is retried too: it may
/// be fixed without restarting.
async fn connect(settings: &Settings, me: &str) -> crate::store::Stores {
    let mut delay = Duration::from_millis(100);
    loop {
        match crate::store::open_all(settings.store_backend(me)).await {
            Ok(s) => return s,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "cannot open the mapping store");
                tokio::time::sleep(delay).await;
                delay = (delay * 3 / 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs until SIGTERM/SIGINT, then drains and returns.
pub async fn run(mut settings: Settings) -> Result<(), RunError> {
    let cfg = settings.config.proxy.clone();
    let me = node_id(&settings);
    let metrics = Arc::new(metrics::ProxyMetrics::new());
    let health = Health::default();
    let drain = Arc::new(drain::Drain::new(health.clone(), metrics.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);

    // Bind both ports first: a taken port is a start-up error, not a retry loop.
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| RunError::Bind {
            field: "proxy.listen",
            addr: cfg.listen,
            source,
        })?;
    let listen = listener.local_addr().unwrap_or(cfg.listen);
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|source| RunError::Bind {
            field: "proxy.admin_listen",
            addr: cfg.admin_listen,
            source,
        })?;
    let admin_addr = admin_listener.local_addr().unwrap_or(cfg.admin_listen);
    // The HTTPS listener and the certificates it serves besides the mappings' own.
    let https = match cfg.tls_listen {
        None => None,
        Some(addr) => {
            let store_key = crate::cert::StoreKey::from_config(
                settings.config.http_domain.tls_store_key_file.as_deref(),
            )
            .map_err(RunError::Config)?;
            if settings.uses_redis && store_key.is_none() {
                tracing::warn!(
                    "proxy.tls_listen without http_domain.tls_store_key_file: certificates from Secrets (spec.tls) cannot be opened; only proxy.tls certificates are served"
                );
            }
            let certs = tls::Certs::new(&cfg.tls, store_key).map_err(RunError::Config)?;
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind {
                    field: "proxy.tls_listen",
                    addr,
                    source,
                })?;
            Some((l, Arc::new(certs)))
        }
    };

    // The tunnel listener is bound with the others (a taken port is a start-up error), and its
    // certificate and secrets are read before anything is served.
    let tcfg = cfg.tunnel.clone();
    let tunnel_tls = tunnel_tls(&tcfg)?;
    let tunnel_listener = match tcfg.listen {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind {
                    field: "proxy.tunnel.listen",
                    addr,
                    source,
                })?,
        ),
    };
    let tunnel_addr = tunnel_listener.as_ref().and_then(|l| l.local_addr().ok());
    let https_addr = https.as_ref().and_then(|(l, _)| l.local_addr().ok());
    // The management API: served here in single-node mode; in a cluster the controller serves
    // it (the proxies do not write mappings).
    let api_listener = match settings.config.api.listen {
        None => None,
        Some(_) if settings.uses_redis => {
            return Err(RunError::Config(
                "api.listen: the proxy serves the management API only in single-node mode (storage.type memory); in a cluster `tunnox controller` serves it".into(),
            ));
        }
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind {
                    field: "api.listen",
                    addr,
                    source,
                })?,
        ),
    };
    let api_addr = api_listener.as_ref().and_then(|l| l.local_addr().ok());
    let api_tls = match &settings.config.api.tls {
        Some(tls) if api_listener.is_some() => {
            Some(crate::api::tls_config(tls).map_err(|e| RunError::Config(e.to_string()))?)
        }
        _ => None,
    };
    let node_token = match &tcfg.node_token_file {
        Some(path) => Some(crate::config::AdminToken::new(
            crate::config::read_secret(path, "proxy.tunnel.node_token_file", "configuration")
                .map_err(|e| RunError::Config(e.to_string()))?,
        )),
        None => {
            if settings.uses_redis {
                tracing::warn!(
                    "proxy.tunnel.node_token_file is not set: requests for tunnel clients whose session is on another node are not forwarded there"
                );
            }
            None
        }
    };
    let credentials = tunnel_credentials(&settings)?;

    let stores = connect(&settings, &me).await;
    let crate::store::Stores {
        mappings: store,
        nodes,
        sessions,
        ports: port_registry,
        challenges,
    } = stores;
    for cred in &credentials {
        sessions.put_credential(cred).await?;
    }
    // Single-node ACME: certificates ordered into files the mappings are served from.
    let acme_dir = match &cfg.acme {
        Some(a) if !settings.uses_redis => Some(a.state_dir()),
        _ => None,
    };
    // The declared list is needed only until the store holds it: not kept for the process's
    // life (about 375 bytes a mapping).
    let declared = std::mem::take(&mut settings.config.mappings);
    let acme_domains = seed::acme_domains(&declared, &settings.config.tunnel_clients);
    if !settings.uses_redis && !declared.is_empty() {
        let changed = seed::apply(
            store.as_ref(),
            &declared,
            &settings.config.tunnel_clients,
            acme_dir.as_deref(),
        )
        .await?;
        tracing::info!(
            declared = declared.len(),
            changed,
            "mappings from the configuration file applied"
        );
    }
    drop(declared);

    let local = &settings.config.http_domain.cache.local;
    let cache_settings = cache::CacheSettings {
        enabled: local.enabled,
        ttl: local.ttl.get(),
        negative_ttl: local.negative_ttl.get(),
        max_entries: local.max_size,
        negative_max_entries: local.negative_max_size,
        base_domains: settings.config.http_domain.base_domains.clone(),
    };
    let cache = Arc::new(cache::RouteCache::new(
        cache_settings,
        store.clone(),
        metrics.clone(),
    ));
    let sync_state = Arc::new(sync::SyncState::default());
    let healthy = Arc::new(registry::HealthySets::default());
    let access = Arc::new(stats::AccessLog::default());

    let admin_routes = admin::routes(admin::AdminContext {
        drain: drain.clone(),
        metrics: metrics.clone(),
        cache: cache.clone(),
        sync: sync_state.clone(),
        propagation_delay: cfg.drain.propagation_delay.get(),
        cache_type: if settings.uses_redis {
            "redis"
        } else {
            "memory"
        },
        max_entries: local.max_size,
        guard: crate::observe::guard::AdminGuard::new(
            settings.admin_token.clone(),
            cfg.admin_trust_loopback,
        ),
    });
    let admin_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let admin_task = admin_server::serve_on(
        admin_listener,
        metrics.registry.clone(),
        health.clone(),
        admin_routes,
        admin_stop,
    );

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(
        sync::CacheSync {
            store: store.clone(),
            cache: cache.clone(),
            metrics: metrics.clone(),
            drain: drain.clone(),
            state: sync_state.clone(),
            check_every: settings.config.http_domain.sync.check_interval.get(),
            rebuild_wait: settings.config.http_domain.sync.rebuild_wait.get(),
        }
        .run(stop_rx.clone()),
    );
    tasks.spawn(
        registry::Heartbeat {
            nodes: nodes.clone(),
            node_id: me.clone(),
            set: cfg.set.clone(),
            address: advertise_address(&settings, listen),
            admin_address: admin_addr.to_string(),
            tunnel_address: tunnel_addr
                .map(|a| tunnel_advertise(&tcfg, a))
                .unwrap_or_default(),
            every: cfg.registry.heartbeat_interval.get(),
            ttl: cfg.registry.ttl.get(),
            drain: drain.clone(),
            sync: sync_state.clone(),
            healthy: healthy.clone(),
        }
        .run(stop_rx.clone()),
    );
    tasks.spawn(access.clone().run(
        store.clone(),
        metrics.clone(),
        cfg.stats_flush_interval.get(),
        stop_rx.clone(),
    ));

    let others = [tunnel_addr, https_addr, api_addr];
    let egress = Arc::new(egress_policy(&settings, listen, admin_addr, &others));
    if let Some(l) = api_listener {
        let api = crate::api::Api {
            store: store.clone(),
            nodes: nodes.clone(),
            intent: Arc::new(crate::api::LocalIntent {
                store: store.clone(),
            }),
            tokens: Arc::new(crate::api::Tokens::new(settings.api_tokens.clone())),
            rules: Arc::new(crate::api::Rules {
                base_domains: settings.config.http_domain.base_domains.clone(),
                egress: (*egress).clone(),
                max_per_user: settings.config.api.max_mappings_per_user,
            }),
            cache: Some(admin::cache_report(
                metrics.clone(),
                cache.clone(),
                "memory",
                settings.config.http_domain.cache.local.max_size,
            )),
        };
        let router = crate::api::router(
            api,
            crate::api::ApiMetrics::new(&metrics.registry, "tunnox_api_requests_total"),
        );
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let stop = async move { stopped(&mut stop).await };
            crate::api::serve(l, router, api_tls, stop).await
        });
    }
    let tunnels = Arc::new(tunnel::Tunnels::new(tunnel::TunnelDeps {
        healthy: healthy.clone(),
        registry: sessions,
        nodes,
        node_id: me.clone(),
        node_address: advertise_address(&settings, listen),
        set: cfg.set.clone(),
        settings: tunnel::TunnelSettings {
            heartbeat: tcfg.heartbeat_interval.get(),
            handshake_timeout: tcfg.handshake_timeout.get(),
            max_streams: tcfg.max_streams_per_session,
            per_client: tcfg.max_sessions_per_client,
            max_sessions: tcfg.max_sessions,
            grace: cfg.drain.grace_period.get(),
            response_timeout: cfg.timeouts.upstream_response.get(),
            connect_timeout: cfg.timeouts.connect.get(),
            websocket_idle: cfg.timeouts.websocket_idle.get(),
        },
        metrics: tunnel::TunnelMetrics::new(&metrics.registry),
        node_token,
        own: [Some(listen), Some(admin_addr)]
            .into_iter()
            .chain(others)
            .flatten()
            .collect(),
        pool_max_idle: cfg.limits.upstream_pool_max_idle,
        pool_idle: cfg.timeouts.upstream_idle.get(),
    }));
    if let Some(l) = tunnel_listener {
        if tunnel_tls.is_none() {
            tracing::warn!(listen = ?tunnel_addr, "proxy.tunnel.insecure: the tunnel listener speaks plain TCP (tokens travel unencrypted); for tests on loopback only");
        }
        tracing::info!(listen = ?tunnel_addr, clients = credentials.len(), "tunnel listener started");
        tasks.spawn(tunnel::serve(
            tunnels.clone(),
            l,
            tunnel_tls.clone(),
            stop_rx.clone(),
        ));
        // Agents of another set move there once the registry shows it serving them.
        tasks.spawn(tunnel::send_home_every(
            tunnels.clone(),
            cfg.registry.heartbeat_interval.get(),
            stop_rx.clone(),
        ));
    }
    // Single-node: the clients' TCP tunnels listen from the start (a port that cannot be bound
    // is a start-up error, like the proxy's own listeners).
    let remote_ports = Arc::new(tunnel::RemotePorts::new(
        tcfg.remote_bind.unwrap_or(listen.ip()),
        tunnels.clone(),
    ));
    let declared = remote_tunnels(&settings);
    if !declared.is_empty() {
        let failed = remote_ports.apply(&declared).await;
        if let Some((port, source)) = failed.into_iter().next() {
            let at = remote_tunnel_field(&settings, port);
            return Err(RunError::Config(format!(
                "{at}: cannot listen on port {port}: {source}"
            )));
        }
    }
    if let Some(registry) = port_registry {
        // Cluster: the set's remote ports as the controller claimed them.
        tasks.spawn(tunnel::follow_ports(
            registry,
            cfg.set.clone(),
            me.clone(),
            remote_ports.clone(),
            stop_rx.clone(),
        ));
    }
    {
        // /drain (preStop) starts the tunnels' make-before-break.
        let tunnels = tunnels.clone();
        let mut started = drain.watch();
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let go = tokio::select! {
                r = started.wait_for(|d| *d) => r.is_ok(),
                _ = stopped(&mut stop) => false,
            };
            if go {
                tunnels.drain("rolling_update").await;
            }
        });
    }
    let ctx = Arc::new(policy::Ctx {
        cache,
        forwarder: forward::Forwarder::new(
            forward::ForwardSettings {
                connect_timeout: cfg.timeouts.connect.get(),
                response_timeout: cfg.timeouts.upstream_response.get(),
                idle_timeout: cfg.timeouts.upstream_idle.get(),
                max_idle_per_host: cfg.limits.upstream_pool_max_idle,
                websocket_idle: cfg.timeouts.websocket_idle.get(),
            },
            egress.clone(),
            metrics.clone(),
        ),
        egress,
        single_node: !settings.uses_redis,
        max_hops: cfg.limits.max_hops,
        tunnels: tunnels.clone(),
        https_port: cfg.tls.redirect_port,
        challenges: Arc::new(acme::Challenges::new(challenges.clone())),
        limits: limits::Limits::new(limits::LimitSettings {
            mapping_concurrency: cfg.limits.mapping_concurrency,
            mapping_rate: (cfg.limits.mapping_rate > 0.0).then_some(limits::Rate {
                per_second: cfg.limits.mapping_rate,
                burst: cfg.limits.mapping_burst,
            }),
            upstream_requests: cfg.limits.upstream_requests,
        }),
        deadlines: deadline::Deadlines {
            client_write_idle: cfg.timeouts.client_write_idle.get(),
            upstream_read_idle: cfg.timeouts.upstream_read_idle.get(),
            request_body_idle: cfg.timeouts.request_body_idle.get(),
            http2_idle: cfg.timeouts.http2_idle.get(),
        },
        metrics: metrics.clone(),
        drain: drain.clone(),
        access,
        healthy,
        set: cfg.set.clone(),
        fast: cfg.fast_path.then(|| {
            h1::FastPath::new(h1::FastSettings {
                header_timeout: cfg.timeouts.request_header.get(),
                connect_timeout: cfg.timeouts.connect.get(),
                response_timeout: cfg.timeouts.upstream_response.get(),
                max_header_bytes: cfg.limits.max_header_bytes,
                max_headers: cfg.limits.max_headers,
                pool_max_idle: cfg.limits.upstream_pool_max_idle,
                pool_idle_timeout: cfg.timeouts.upstream_idle.get(),
                client_write_idle: cfg.timeouts.client_write_idle.get(),
                upstream_read_idle: cfg.timeouts.upstream_read_idle.get(),
            })
        }),
    });
    if ctx.fast.is_some() {
        let ctx = ctx.clone();
        let every = cfg.timeouts.upstream_idle.get() / 2;
        let stop = stop_rx.clone();
        tasks.spawn(async move {
            if let Some(fast) = &ctx.fast {
                fast.sweep_pool(&ctx.tunnels, every, stop).await;
            }
        });
    }
    tracing::info!(%listen, admin = %admin_addr, node = %me, set = %cfg.set, "proxy listening");
    if let (Some(acme), false) = (&cfg.acme, settings.uses_redis || acme_domains.is_empty()) {
        tracing::info!(domains = acme_domains.len(), directory = %acme.directory_url, state_dir = %acme.state_dir().display(), "ordering certificates through ACME");
        tasks.spawn(
            crate::acme::files::FileIssuer {
                cfg: acme.clone(),
                domains: acme_domains,
                challenges,
                metrics: metrics.acme.clone(),
            }
            .run(stop_rx.clone()),
        );
    }

    let (serve_stop_tx, serve_stop_rx) = watch::channel(false);
    let server_settings = server::ServerSettings {
        max_header_bytes: cfg.limits.max_header_bytes,
        max_headers: cfg.limits.max_headers,
        header_timeout: cfg.timeouts.request_header.get(),
        grace_period: cfg.drain.grace_period.get(),
        max_connections: cfg.limits.max_connections,
    };
    let https_server = https.map(|(l, certs)| {
        tracing::info!(listen = %l.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), "HTTPS listening");
        {
            // Operator certificate files are checked for changes.
            let certs = certs.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(certs.reload_interval());
                loop {
                    tokio::select! {
                        _ = tick.tick() => certs.reload_operator(),
                        _ = stopped(&mut stop) => return,
                    }
                }
            });
        }
        tokio::spawn(server::serve(
            l,
            ctx.clone(),
            server_settings,
            serve_stop_rx.clone(),
            Some(certs),
        ))
    });
    let server = tokio::spawn(server::serve(
        listener,
        ctx,
        server_settings,
        serve_stop_rx,
        None,
    ));

    crate::observe::shutdown_signal().await;
    tracing::info!("shutting down");
    // No new connections on remote ports; those open end with their sessions.
    remote_ports.close_all();
    if !drain.is_draining() {
        // No preStop drain came first: agents are told this is a shutdown.
        tunnels.drain("shutdown").await;
    }
    drain.start();
    let shutdown = {
        let tunnels = tunnels.clone();
        let grace = cfg.drain.grace_period.get();
        tokio::spawn(async move { tunnels.shutdown(grace).await })
    };
    let _ = serve_stop_tx.send(true);
    let _ = server.await;
    if let Some(s) = https_server {
        let _ = s.await;
    }
    let _ = shutdown.await;
    // In-flight requests are done: write their statistics, leave the registry, stop.
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// The tunnel listener's TLS configuration; `None` with `proxy.tunnel.insecure` (or no listener).
fn tunnel_tls(
    t: &crate::config::TunnelListenerConfig,
) -> Result<Option<Arc<rustls::ServerConfig>>, RunError> {
    if t.listen.is_none() || t.insecure {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) else {
        return Err(RunError::Config(
            "proxy.tunnel.cert_file and key_file are required with proxy.tunnel.listen".into(),
        ));
    };
    crate::tunnel::tls::server_config(cert, key)
        .map(|c| Some(Arc::new(c)))
        .map_err(|e| RunError::Config(e.to_string()))
}

/// `host:port` agents are told to dial this node on.
fn tunnel_advertise(t: &crate::config::TunnelListenerConfig, bound: SocketAddr) -> String {
    if let Some(a) = &t.advertise_address {
        return a.clone();
    }
    match std::env::var("POD_IP") {
        Ok(ip) if !ip.is_empty() => {
            SocketAddr::new(ip.parse().unwrap_or(bound.ip()), bound.port()).to_string()
        }
        _ => bound.to_string(),
    }
}

/// Single-node: the `tunnels` of every `tunnel_clients` entry (checked when the file was read);
/// the tunnels of one `group` share their port, each client's a member (the group's `balance`
/// and limits are those of its first entry).
fn remote_tunnels(settings: &Settings) -> Vec<tunnel::RemoteTunnel> {
    let mut out: Vec<tunnel::RemoteTunnel> = Vec::new();
    for c in &settings.config.tunnel_clients {
        for t in &c.tunnels {
            let host = &t.local_host;
            let target = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{}", t.local_port)
            } else {
                format!("{host}:{}", t.local_port)
            };
            let backend = tunnel::Backend {
                client_id: c.client_id.clone(),
                name: t.name.clone(),
                target,
            };
            if let Some(joined) = out.iter_mut().find(|o| o.port == t.remote_port) {
                joined.backends.push(backend);
                continue;
            }
            out.push(tunnel::RemoteTunnel {
                name: t.group.clone().unwrap_or_else(|| t.name.clone()),
                backends: vec![backend],
                balance: t.balance.unwrap_or_default(),
                port: t.remote_port,
                max_connections: t.max_connections,
                max_bytes_per_second: t.max_bytes_per_second,
                health_check: t.health_check.as_ref().map(|h| h.to_check()),
                udp_idle: (t.kind == crate::config::TunnelKind::Udp).then(|| {
                    t.udp_session_timeout
                        .unwrap_or(crate::config::DEFAULT_UDP_SESSION_TIMEOUT)
                        .get()
                }),
            });
        }
    }
    out
}

/// The field declaring remote port `port`, for an error message.
fn remote_tunnel_field(settings: &Settings, port: u16) -> String {
    for (i, c) in settings.config.tunnel_clients.iter().enumerate() {
        if let Some(j) = c.tunnels.iter().position(|t| t.remote_port == port) {
            return format!("tunnel_clients[{i}].tunnels[{j}].remote_port");
        }
    }
    "tunnel_clients".into()
}

/// Single-node: `tunnel_clients` as credentials (the token hashed; a token file read like the
/// other secret files). A cluster's come from the controller.
fn tunnel_credentials(
    settings: &Settings,
) -> Result<Vec<crate::tunnel::credential::ClientCredential>, RunError> {
    let mut out = Vec::new();
    for (i, c) in settings.config.tunnel_clients.iter().enumerate() {
        let token = match (&c.token, &c.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(path)) => crate::config::read_secret(
                path,
                &format!("tunnel_clients[{i}].token_file"),
                "configuration",
            )
            .map_err(|e| RunError::Config(e.to_string()))?,
            (None, None) => {
                return Err(RunError::Config(format!(
                    "tunnel_clients[{i}]: token or token_file is required"
                )));
            }
        };
        out.push(crate::tunnel::credential::ClientCredential {
            client_id: c.client_id.clone(),
            token_sha256: crate::tunnel::credential::TokenHash::of(&token),
            placement: None,
            source: Some(seed::SOURCE.into()),
        });
    }
    Ok(out)
}
