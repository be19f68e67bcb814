//! Seed 001's auto-sharing rules and whole-configuration validation, as pure functions.

use std::collections::HashMap;

use redis::IntoConnectionInfo;

use super::{BrokerType, CacheType, Config, ConfigError, StorageType};
use crate::domain::egress::Rule;
use crate::domain::{Declarer, EgressPolicy, Hostname, MappingSpec};
use crate::store::{PersistOptions, RedisOptions, RedisTls, SentinelOptions, StoreBackend};

/// Rule 1: storage Redis → message broker.
pub const AUTO_BROKER: &str =
    "Storage Redis detected, auto-configuring message_broker to use redis for multi-node support";
/// Rule 2: message broker Redis → storage.
pub const AUTO_STORAGE: &str =
    "MessageBroker Redis detected, auto-configuring storage.redis for distributed cache";
/// Rule 3: cache upgrade.
pub const AUTO_CACHE: &str =
    "Redis detected, auto-upgrading cache from 'memory' to 'redis' for multi-node support";

/// Applies the three auto-sharing rules of seed 001 in order and returns the line each rule
/// that fired logs.
pub fn apply_auto_sharing(cfg: &mut Config) -> Vec<&'static str> {
    let mut fired = Vec::new();
    let storage_has_redis = cfg.storage.redis.is_configured();
    if storage_has_redis && matches!(cfg.message_broker.kind, None | Some(BrokerType::Memory)) {
        let b = &mut cfg.message_broker;
        b.kind = Some(BrokerType::Redis);
        b.redis.addr = cfg.storage.redis.addr.clone();
        b.redis.password = cfg.storage.redis.password.clone();
        b.redis.db = cfg.storage.redis.db;
        fired.push(AUTO_BROKER);
    }
    let broker = &cfg.message_broker;
    if broker.kind == Some(BrokerType::Redis)
        && !broker.redis.addr.is_empty()
        && !cfg.storage.redis.is_configured()
    {
        let s = &mut cfg.storage.redis;
        s.addr = broker.redis.addr.clone();
        s.password = broker.redis.password.clone();
        s.db = broker.redis.db;
        fired.push(AUTO_STORAGE);
    }
    if cfg.storage.kind == StorageType::Hybrid
        && matches!(
            cfg.storage.hybrid.cache_type,
            None | Some(CacheType::Memory)
        )
        && cfg.storage.redis.is_configured()
    {
        cfg.storage.hybrid.cache_type = Some(CacheType::Redis);
        fired.push(AUTO_CACHE);
    }
    fired
}

/// A validated configuration and what was decided from it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    /// The auto-sharing lines to log at start.
    pub auto_shared: Vec<&'static str>,
    /// Accepted but ineffective settings, to log as warnings.
    pub warnings: Vec<String>,
    pub uses_redis: bool,
    /// `egress` parsed, without any process's own listeners (each role adds its own).
    pub egress: EgressPolicy,
    /// The admin bearer token, read from `proxy.admin_token_file` by [`super::load`].
    pub admin_token: Option<super::AdminToken>,
    /// The management API's tokens and their roles, read by [`super::load`].
    pub api_tokens: Vec<(super::AdminToken, super::ApiRole)>,
}

impl Settings {
    /// Where mappings live, for a process identified as `node_id`.
    pub fn store_backend(&self, node_id: &str) -> StoreBackend {
        let c = &self.config;
        let sync = &c.http_domain.sync;
        if self.uses_redis {
            let r = &c.storage.redis;
            let prefix = c
                .http_domain
                .persistence
                .key_prefix
                .clone()
                .unwrap_or_else(|| format!("{}:http_domain", r.key_prefix));
            let sentinel = &r.sentinel;
            StoreBackend::Redis(RedisOptions {
                url: r.addr.clone(),
                sentinel: sentinel.is_set().then(|| SentinelOptions {
                    master_name: sentinel.master_name.clone(),
                    addrs: sentinel.addrs.clone(),
                    password: (!sentinel.password.is_empty()).then(|| sentinel.password.clone()),
                    tls: sentinel.tls,
                }),
                password: (!r.password.is_empty()).then(|| r.password.clone()),
                db: r.db,
                pool_size: r.pool_size,
                tls: RedisTls {
                    ca_file: r.tls.ca_file.clone(),
                    cert_file: r.tls.cert_file.clone(),
                    key_file: r.tls.key_file.clone(),
                },
                root_prefix: r.key_prefix.clone(),
                prefix,
                events_channel: sync.channel.clone(),
                changes_max_len: sync.changes_max_len,
                subscription_buffer: sync.buffer_size,
                node_id: node_id.to_string(),
                response_timeout: r.response_timeout.get(),
                connect_timeout: r.connect_timeout.get(),
                wait_replicas: r.wait_replicas,
                wait_timeout: r.wait_timeout.get(),
            })
        } else {
            let h = &c.storage.hybrid;
            StoreBackend::Memory {
                persist: h.enable_persistent.then(|| PersistOptions {
                    path: h.json.file_path.clone(),
                    auto_save: h.json.auto_save,
                    save_interval: h.json.save_interval.get(),
                }),
                changes_max_len: sync.changes_max_len as usize,
                subscription_buffer: sync.buffer_size,
                node_id: node_id.to_string(),
            }
        }
    }
}

/// Applies the auto-sharing rules and validates everything a type cannot express.
pub fn resolve(mut cfg: Config, origin: &str) -> Result<Settings, ConfigError> {
    let err = |path: &str, msg: String| ConfigError::at(origin, path, msg, None, None);

    if cfg.storage.kind == StorageType::Memory {
        if !cfg.storage.redis.addr.is_empty() {
            return Err(err("storage.redis.addr", "is set but storage.type is memory (single node, no Redis); use storage.type hybrid or redis".into()));
        }
        if cfg.storage.redis.sentinel.is_set() {
            return Err(err("storage.redis.sentinel", "is set but storage.type is memory (single node, no Redis); use storage.type hybrid or redis".into()));
        }
        if cfg.message_broker.kind == Some(BrokerType::Redis) {
            return Err(err("message_broker.type", "is redis but storage.type is memory (single node, no Redis); use storage.type hybrid or redis".into()));
        }
    }
    let auto_shared = apply_auto_sharing(&mut cfg);

    let redis_addr = cfg.storage.redis.addr.clone();
    let has_redis = cfg.storage.redis.is_configured();
    if cfg.storage.hybrid.cache_type == Some(CacheType::Redis) && !has_redis {
        return Err(err("storage.redis.addr", "redis cache enabled (storage.hybrid.cache_type: redis) but storage.redis.addr is not configured (nor storage.redis.sentinel)".into()));
    }
    if cfg.storage.kind == StorageType::Redis && !has_redis {
        return Err(err(
            "storage.redis.addr",
            "is required when storage.type is redis (or storage.redis.sentinel)".into(),
        ));
    }
    // Behind sentinels the broker is the storage's Redis: it has no address of its own.
    if cfg.message_broker.kind == Some(BrokerType::Redis)
        && cfg.message_broker.redis.addr.is_empty()
        && !cfg.storage.redis.sentinel.is_set()
    {
        return Err(err(
            "message_broker.redis.addr",
            "is required when message_broker.type is redis".into(),
        ));
    }
    for (path, addr) in [
        ("storage.redis.addr", &redis_addr),
        ("message_broker.redis.addr", &cfg.message_broker.redis.addr),
    ] {
        if !addr.is_empty() {
            check_redis_addr(addr).map_err(|m| err(path, m))?;
        }
    }
    let r = &cfg.storage.redis;
    if r.pool_size == 0 {
        return Err(err("storage.redis.pool_size", "must be at least 1".into()));
    }
    if r.db < 0 {
        return Err(err(
            "storage.redis.db",
            format!("must not be negative, got {}", r.db),
        ));
    }
    if r.tls.cert_file.is_some() != r.tls.key_file.is_some() {
        return Err(err(
            "storage.redis.tls",
            "cert_file and key_file must be set together".into(),
        ));
    }
    check_sentinel(r).map_err(|(path, msg)| err(&path, msg))?;
    check_wait(r).map_err(|(path, msg)| err(path, msg))?;
    let local = &cfg.http_domain.cache.local;
    if local.max_size == 0 {
        return Err(err(
            "http_domain.cache.local.max_size",
            "must be at least 1".into(),
        ));
    }
    if local.ttl.get().is_zero() {
        return Err(err(
            "http_domain.cache.local.ttl",
            "must be greater than 0".into(),
        ));
    }
    if local.negative_max_size == 0 {
        return Err(err(
            "http_domain.cache.local.negative_max_size",
            "must be at least 1".into(),
        ));
    }
    let sync = &cfg.http_domain.sync;
    if sync.buffer_size == 0 {
        return Err(err(
            "http_domain.sync.buffer_size",
            "must be at least 1".into(),
        ));
    }
    if sync.changes_max_len == 0 {
        return Err(err(
            "http_domain.sync.changes_max_len",
            "must be at least 1".into(),
        ));
    }
    if sync.check_interval.get().is_zero() {
        return Err(err(
            "http_domain.sync.check_interval",
            "must be greater than 0".into(),
        ));
    }
    if sync.rebuild_wait.get().is_zero() {
        return Err(err(
            "http_domain.sync.rebuild_wait",
            "must be greater than 0 (a proxy waits this long for the controller's rebuild)".into(),
        ));
    }
    if cfg.http_domain.enabled && cfg.http_domain.base_domains.is_empty() {
        return Err(err(
            "http_domain.base_domains",
            "must list at least one domain when http_domain is enabled".into(),
        ));
    }
    let ctl = &cfg.controller;
    if ctl.renew_interval.get().is_zero() || ctl.renew_interval >= ctl.lease_duration {
        return Err(err(
            "controller.renew_interval",
            format!(
                "must be greater than 0 and shorter than controller.lease_duration ({})",
                ctl.lease_duration
            ),
        ));
    }
    if ctl.resync_interval.get().is_zero() {
        return Err(err(
            "controller.resync_interval",
            "must be greater than 0".into(),
        ));
    }
    if ctl.tls_recheck_interval.get().is_zero() {
        return Err(err(
            "controller.tls_recheck_interval",
            "must be greater than 0".into(),
        ));
    }
    if ctl.concurrency == 0 {
        return Err(err("controller.concurrency", "must be at least 1".into()));
    }
    if ctl.conflict_retry.get().is_zero() {
        return Err(err(
            "controller.conflict_retry",
            "must be greater than 0".into(),
        ));
    }
    if let Some(acme) = &ctl.acme {
        check_acme(acme, AcmeRole::Controller).map_err(|(field, m)| err(&field, m))?;
    }
    if let Some(id) = &ctl.cluster_id {
        check_cluster_id(id).map_err(|m| err("controller.cluster_id", m))?;
    }
    let svc = &ctl.tunnel_service;
    if !matches!(svc.kind.as_str(), "ClusterIP" | "NodePort" | "LoadBalancer") {
        return Err(err(
            "controller.tunnel_service.type",
            format!("{:?} is not ClusterIP, NodePort or LoadBalancer", svc.kind),
        ));
    }
    if svc.enabled && svc.selector.is_empty() {
        return Err(err(
            "controller.tunnel_service.selector",
            "is empty: give the proxy pods' labels (a Service without a selector reaches nothing)"
                .into(),
        ));
    }
    if let [lo, hi] = ctl.remote_port_range
        && (lo == 0 || lo > hi)
    {
        return Err(err(
            "controller.remote_port_range",
            format!("[{lo}, {hi}] is not a range of ports: give [lowest, highest], 1-65535"),
        ));
    }
    check_proxy(&cfg.proxy).map_err(|(path, msg)| err(path, msg))?;
    let egress = egress_policy(&cfg.egress).map_err(|(path, msg)| err(&path, msg))?;
    let mut warnings = Vec::new();
    check_mappings(&cfg, &egress, &mut warnings).map_err(|(path, msg)| err(&path, msg))?;

    if cfg.http_domain.cache.shared.is_some() {
        warnings.push(
            "http_domain.cache.shared has no effect: the Redis store is the shared layer"
                .to_string(),
        );
    }
    if cfg.http_domain.lock.is_some() {
        warnings.push(
            "http_domain.lock has no effect: domain claims are atomic and take no lock".to_string(),
        );
    }
    let uses_redis = match cfg.storage.kind {
        StorageType::Redis => true,
        StorageType::Hybrid => cfg.storage.hybrid.cache_type == Some(CacheType::Redis),
        StorageType::Memory => false,
    };
    super::tunnel::check_listener(&cfg.proxy.tunnel)
        .and_then(|()| {
            let named: Vec<Option<String>> = cfg
                .mappings
                .iter()
                .map(|m| m.target_client_id.clone())
                .collect();
            let own: Vec<u16> = [
                Some(cfg.proxy.listen.port()),
                Some(cfg.proxy.admin_listen.port()),
                cfg.proxy.tunnel.listen.map(|a| a.port()),
            ]
            .into_iter()
            .flatten()
            .collect();
            super::tunnel::check_clients(
                &cfg.tunnel_clients,
                uses_redis,
                &named,
                &cfg.proxy.tunnel,
                &own,
            )
        })
        .and_then(|()| super::tunnel::check_group_targets(&cfg.tunnel_clients, &cfg.mappings))
        .map_err(|(path, msg)| err(&path, msg))?;
    if let Some(acme) = &cfg.proxy.acme {
        if uses_redis {
            return Err(err(
                "proxy.acme",
                "is for single-node mode (no Redis); in a cluster, set controller.acme".into(),
            ));
        }
        check_acme(acme, AcmeRole::Proxy).map_err(|(field, m)| err(&field, m))?;
    }
    if uses_redis && !cfg.mappings.is_empty() {
        return Err(err("mappings", "declaring mappings in the file is for single-node mode (no Redis); in a cluster, apply HTTPDomainMapping resources".into()));
    }
    Ok(Settings {
        config: cfg,
        auto_shared,
        warnings,
        uses_redis,
        egress,
        admin_token: None,
        api_tokens: Vec::new(),
    })
}

/// A cluster id becomes part of every record's source (`k8s:<id>/<ns>/<name>`) and of Redis
/// keys: no `/` (it separates the parts), no braces (hash tags), nothing a reader must escape.
fn check_cluster_id(id: &str) -> Result<(), String> {
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    let ok = (1..=63).contains(&id.len())
        && id
            .bytes()
            .all(|b| alnum(b) || b == b'-' || b == b'.' || b == b'_')
        && id.bytes().next().is_some_and(alnum)
        && id.bytes().last().is_some_and(alnum);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{id:?} must be 1-63 letters, digits, '-', '.' or '_', starting and ending with a \
             letter or digit (e.g. prod-eu-1)"
        ))
    }
}

fn check_redis_addr(addr: &str) -> Result<(), String> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("redis://{addr}")
    };
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(format!(
            "{addr:?} must be host:port, redis://… or rediss://…"
        ));
    }
    url.as_str()
        .into_connection_info()
        .map(|_| ())
        .map_err(|e| format!("{addr:?} is not a valid Redis address: {e}"))
}

/// `storage.redis.sentinel`: a master name and at least one sentinel, each a plain address
/// (credentials go in `password`), all with TLS or none; exclusive with `storage.redis.addr`.
fn check_sentinel(r: &crate::config::RedisConfig) -> Result<(), (String, String)> {
    let s = &r.sentinel;
    if !s.is_set() {
        return Ok(());
    }
    let at = |field: &str| format!("storage.redis.sentinel.{field}");
    if !r.addr.is_empty() {
        return Err((
            "storage.redis.addr".into(),
            format!(
                "{:?} is set together with storage.redis.sentinel; with sentinels the master's address comes from them, so leave addr empty",
                r.addr
            ),
        ));
    }
    if s.master_name.is_empty() {
        return Err((
            at("master_name"),
            "is required when storage.redis.sentinel.addrs is set (the name in `sentinel monitor <name> ...`)".into(),
        ));
    }
    if s.master_name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err((
            at("master_name"),
            format!(
                "{:?} must not contain spaces or control characters",
                s.master_name
            ),
        ));
    }
    if s.addrs.is_empty() {
        return Err((
            at("addrs"),
            "must list at least one sentinel (host:port) when storage.redis.sentinel.master_name is set".into(),
        ));
    }
    let mut first_tls = None;
    for (i, raw) in s.addrs.iter().enumerate() {
        let path = format!("storage.redis.sentinel.addrs[{i}]");
        check_redis_addr(raw).map_err(|m| (path.clone(), m))?;
        let url = if raw.contains("://") {
            raw.clone()
        } else {
            format!("redis://{raw}")
        };
        let info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| (path.clone(), format!("{raw:?}: {e}")))?;
        let settings = info.redis_settings();
        if settings.password().is_some() || settings.username().is_some() || settings.db() != 0 {
            return Err((
                path,
                format!(
                    "{raw:?} must be a plain address: put the sentinels' password in storage.redis.sentinel.password and the database in storage.redis.db"
                ),
            ));
        }
        let tls = url.starts_with("rediss://");
        match first_tls {
            None => first_tls = Some(tls),
            Some(t) if t != tls => {
                return Err((
                    path,
                    format!("{raw:?}: use rediss:// for every sentinel or for none"),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// `WAIT` must end before the connection gives up on the reply.
fn check_wait(r: &crate::config::RedisConfig) -> Result<(), (&'static str, String)> {
    if r.wait_replicas == 0 {
        return Ok(());
    }
    if r.wait_timeout.get().is_zero() || r.wait_timeout >= r.response_timeout {
        return Err((
            "storage.redis.wait_timeout",
            format!(
                "{} must be greater than 0 and shorter than storage.redis.response_timeout ({}) when storage.redis.wait_replicas is set",
                r.wait_timeout, r.response_timeout
            ),
        ));
    }
    Ok(())
}

fn egress_policy(e: &crate::config::EgressConfig) -> Result<EgressPolicy, (String, String)> {
    let parse = |field: &str, list: &[String]| {
        list.iter()
            .enumerate()
            .map(|(i, raw)| Rule::parse(raw).map_err(|m| (format!("egress.{field}[{i}]"), m)))
            .collect::<Result<Vec<_>, _>>()
    };
    let domain = e.cluster_domain.trim_end_matches('.');
    if Hostname::parse(domain).is_err() && domain != "local" {
        return Err((
            "egress.cluster_domain".into(),
            format!("{:?} is not a DNS name", e.cluster_domain),
        ));
    }
    Ok(EgressPolicy::new(
        parse("allow", &e.allow)?,
        parse("deny", &e.deny)?,
        domain,
    ))
}

/// The file's mappings are the operator's own (they may reach loopback) but never the proxy's
/// own listeners.
fn check_mappings(
    cfg: &Config,
    egress: &EgressPolicy,
    warnings: &mut Vec<String>,
) -> Result<(), (String, String)> {
    let own = egress
        .clone()
        .with_own_listeners([cfg.proxy.listen, cfg.proxy.admin_listen], []);
    let mut seen: HashMap<Hostname, usize> = HashMap::new();
    for (i, m) in cfg.mappings.iter().enumerate() {
        let at = |field: &str| format!("mappings[{i}].{field}");
        if !cfg.http_domain.base_domains.contains(&m.base_domain) {
            return Err((
                at("base_domain"),
                format!("{} is not in http_domain.base_domains", m.base_domain),
            ));
        }
        let mut spec = MappingSpec::new("x", m.base_domain.as_str(), &m.target_host, m.target_port);
        spec.subdomain = m.subdomain.clone();
        spec.custom_headers = m.custom_headers.clone();
        spec.target_scheme = m.target_scheme;
        spec.target_client_id = m.target_client_id.clone();
        if let Some(f) = m.target_tls.as_ref().and_then(|t| t.ca_file.as_ref())
            && let Err(e) = super::model::read_ca(f)
        {
            return Err((at("target_tls.ca_file"), e));
        }
        spec.upstream = m.upstream();
        if m.target_group.is_some() && !spec.upstream.is_default() {
            return Err((
                at("target_protocol"),
                "protocol and CA settings apply to direct targets, not to tunnels".into(),
            ));
        }
        let full = spec
            .validate()
            .map_err(|e| (format!("mappings[{i}]"), e.to_string()))?;
        // A tunnel's target is on the agent's side: its own allow-list judges it.
        if m.target_client_id.is_none() && m.target_group.is_none() {
            own.check_declared(&m.target_host, m.target_port, None, Declarer::Operator)
                .map_err(|e| (at("target_host"), e.to_string()))?;
        }
        if let Some(first) = seen.insert(full.clone(), i) {
            return Err((
                at("subdomain"),
                format!("{full} is already declared by mappings[{first}]"),
            ));
        }
        if let Some(t) = &m.tls {
            check_mapping_cert(cfg, t, &full, &at("tls"), warnings)?;
        }
    }
    Ok(())
}

/// A mapping's certificate: from `proxy.acme`, which must be set, or from files that load,
/// whose key matches and whose certificate covers the domain; an expired one is a warning (the
/// proxy still starts: its other mappings work, and the file may be replaced while it runs).
fn check_mapping_cert(
    cfg: &Config,
    t: &crate::config::MappingTlsEntry,
    full: &Hostname,
    at: &str,
    warnings: &mut Vec<String>,
) -> Result<(), (String, String)> {
    if cfg.proxy.tls_listen.is_none() {
        return Err((
            at.into(),
            "needs the HTTPS listener: set proxy.tls_listen".into(),
        ));
    }
    let (cert_file, key_file) = match t.cert().map_err(|(f, m)| (format!("{at}.{f}"), m))? {
        crate::config::MappingCert::Files {
            cert_file,
            key_file,
        } => (cert_file, key_file),
        crate::config::MappingCert::Acme if cfg.proxy.acme.is_none() => {
            return Err((
                format!("{at}.acme"),
                "needs an ACME server: set proxy.acme.directory_url".into(),
            ));
        }
        crate::config::MappingCert::Acme => return Ok(()),
    };
    let cert =
        crate::cert::Cert::from_files(cert_file, key_file).map_err(|e| (at.to_string(), e))?;
    if !cert.covers(full.as_str()) {
        return Err((
            format!("{at}.cert_file"),
            format!(
                "the certificate is for [{}], not {full}",
                cert.names.join(", ")
            ),
        ));
    }
    if cert.expired(chrono::Utc::now()) {
        warnings.push(format!(
            "{at}.cert_file: the certificate for {full} expired at {}",
            cert.not_after
        ));
    }
    Ok(())
}

/// Limits a proxy cannot run with, named by field.
fn check_proxy(p: &crate::config::ProxyConfig) -> Result<(), (&'static str, String)> {
    if p.tls.redirect_port == 0 {
        return Err(("proxy.tls.redirect_port", "must be 1-65535, got 0".into()));
    }
    if p.tls.reload_interval.get().is_zero() {
        return Err((
            "proxy.tls.reload_interval",
            "must be positive, got 0s".into(),
        ));
    }
    let positive = [
        ("proxy.timeouts.connect", p.timeouts.connect),
        ("proxy.timeouts.request_header", p.timeouts.request_header),
        (
            "proxy.timeouts.upstream_response",
            p.timeouts.upstream_response,
        ),
        ("proxy.timeouts.upstream_idle", p.timeouts.upstream_idle),
        (
            "proxy.timeouts.client_write_idle",
            p.timeouts.client_write_idle,
        ),
        (
            "proxy.timeouts.upstream_read_idle",
            p.timeouts.upstream_read_idle,
        ),
        (
            "proxy.timeouts.request_body_idle",
            p.timeouts.request_body_idle,
        ),
        ("proxy.timeouts.websocket_idle", p.timeouts.websocket_idle),
        ("proxy.timeouts.http2_idle", p.timeouts.http2_idle),
        (
            "proxy.registry.heartbeat_interval",
            p.registry.heartbeat_interval,
        ),
        ("proxy.stats_flush_interval", p.stats_flush_interval),
    ];
    for (path, d) in positive {
        if d.get().is_zero() {
            return Err((path, "must be greater than 0".into()));
        }
    }
    // hyper needs room for at least one 8 KiB read buffer.
    if p.limits.max_header_bytes < 8192 {
        return Err((
            "proxy.limits.max_header_bytes",
            format!("must be at least 8192, got {}", p.limits.max_header_bytes),
        ));
    }
    if p.limits.max_headers == 0 {
        return Err(("proxy.limits.max_headers", "must be at least 1".into()));
    }
    if !(1..=64).contains(&p.limits.max_hops) {
        return Err((
            "proxy.limits.max_hops",
            format!("must be 1 to 64, got {}", p.limits.max_hops),
        ));
    }
    if p.limits.max_connections == 0 {
        return Err(("proxy.limits.max_connections", "must be at least 1".into()));
    }
    let rate = p.limits.mapping_rate;
    if !(rate.is_finite() && (0.0..=1e9).contains(&rate)) {
        return Err((
            "proxy.limits.mapping_rate",
            format!("must be requests per second from 0 (no limit) to 1e9, got {rate}"),
        ));
    }
    if p.limits.mapping_burst == 0 {
        return Err(("proxy.limits.mapping_burst", "must be at least 1".into()));
    }
    if p.registry.ttl <= p.registry.heartbeat_interval {
        return Err((
            "proxy.registry.ttl",
            format!(
                "must be longer than proxy.registry.heartbeat_interval ({}), or a live node expires between heartbeats",
                p.registry.heartbeat_interval
            ),
        ));
    }
    if p.worker_threads > super::MAX_WORKER_THREADS {
        return Err((
            "proxy.worker_threads",
            format!(
                "must be 0 (one per CPU) to {}, got {}",
                super::MAX_WORKER_THREADS,
                p.worker_threads
            ),
        ));
    }
    Ok(())
}

/// Who orders with an ACME section: its fields are named from it, and the other's own fields
/// are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcmeRole {
    /// `controller.acme`: the account and certificates in Secrets.
    Controller,
    /// `proxy.acme` (single-node): in files.
    Proxy,
}

/// An ACME section: an `https://` directory (plain `http://` only on loopback), positive
/// durations, and for the controller a Secret name Kubernetes accepts.
pub(crate) fn check_acme(
    acme: &super::model::AcmeConfig,
    role: AcmeRole,
) -> Result<(), (String, String)> {
    let section = match role {
        AcmeRole::Controller => "controller.acme",
        AcmeRole::Proxy => "proxy.acme",
    };
    let field = |f: &str| format!("{section}.{f}");
    let url = acme.directory_url.as_str();
    let parsed = url.parse::<http::Uri>().ok();
    let loopback_http = parsed.as_ref().is_some_and(|u| {
        u.scheme_str() == Some("http")
            && u.host().is_some_and(|h| {
                h == "localhost"
                    || h.trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            })
    });
    if !(parsed
        .as_ref()
        .is_some_and(|u| u.scheme_str() == Some("https") && u.host().is_some())
        || loopback_http)
    {
        return Err((
            field("directory_url"),
            format!("{url:?} is not an https:// URL"),
        ));
    }
    if let Some(email) = &acme.email
        && (email.len() > 254
            || email.split('@').count() != 2
            || email.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err((field("email"), format!("{email:?} is not an email address")));
    }
    let secret = &acme.account_secret;
    if role == AcmeRole::Controller
        && (secret.is_empty()
            || secret.len() > 253
            || !secret
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'))
    {
        return Err((
            field("account_secret"),
            format!("{secret:?} is not a Secret name (lowercase letters, digits, '-', '.')"),
        ));
    }
    let refused: &[(&str, bool)] = match role {
        AcmeRole::Controller => &[
            ("state_dir", acme.state_dir.is_some()),
            ("check_interval", acme.check_interval.is_some()),
        ],
        AcmeRole::Proxy => &[
            ("namespace", acme.namespace.is_some()),
            (
                "account_secret",
                acme.account_secret != super::model::AcmeConfig::default().account_secret,
            ),
        ],
    };
    if let Some((name, _)) = refused.iter().find(|(_, set)| *set) {
        let (other, keeps) = match role {
            AcmeRole::Controller => ("proxy.acme", "files"),
            AcmeRole::Proxy => ("controller.acme", "Secrets"),
        };
        return Err((
            field(name),
            format!("is for {other} only (which keeps the account and certificates in {keeps})"),
        ));
    }
    if let Some(f) = &acme.ca_file {
        let ca_field = match role {
            AcmeRole::Controller => "controller.acme.ca_file",
            AcmeRole::Proxy => "proxy.acme.ca_file",
        };
        crate::tunnel::tls::load_certs(f, ca_field)
            .map_err(|e| (field("ca_file"), e.to_string()))?;
    }
    if let Some(d) = acme.check_interval
        && (d.get() < std::time::Duration::from_secs(1)
            || d.get() > std::time::Duration::from_secs(86_400))
    {
        return Err((field("check_interval"), "must be between 1s and 24h".into()));
    }
    for (name, d) in [
        ("challenge_ttl", acme.challenge_ttl),
        ("order_timeout", acme.order_timeout),
        ("retry_max", acme.retry_max),
        ("min_reorder_interval", acme.min_reorder_interval),
    ] {
        if d.get() < std::time::Duration::from_secs(1)
            || d.get() > std::time::Duration::from_secs(86_400)
        {
            return Err((field(name), "must be between 1s and 24h".into()));
        }
    }
    if !(1..=10_000).contains(&acme.max_orders_per_hour) {
        return Err((
            field("max_orders_per_hour"),
            format!("{} is not between 1 and 10000", acme.max_orders_per_hour),
        ));
    }
    Ok(())
}
