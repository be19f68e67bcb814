//! Connecting to Redis: addresses, credentials, TLS, connection manager settings, and the
//! Sentinel client that names the current master.

use std::path::PathBuf;
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, IntoConnectionInfo, TlsMode};

use crate::store::StoreError;

/// TLS material for `rediss://` beyond the system's web PKI roots.
#[derive(Debug, Clone, Default)]
pub struct RedisTls {
    /// PEM bundle of CA certificates to trust instead of the built-in roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// Where to find the master through Redis Sentinel (`storage.redis.sentinel`).
#[derive(Debug, Clone, Default)]
pub struct SentinelOptions {
    /// The name the sentinels monitor the master under (`sentinel monitor <name> …`).
    pub master_name: String,
    /// The sentinels: `host:port`, `redis://host:port` or `rediss://host:port` (TLS to them).
    pub addrs: Vec<String>,
    /// The sentinels' own password (their `requirepass`); the master's is
    /// [`RedisOptions::password`].
    pub password: Option<String>,
    /// TLS to the master the sentinels name (they report bare addresses).
    pub tls: bool,
}

#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `host:port`, `redis://…` or `rediss://…` (TLS). Unused when `sentinel` is set.
    pub url: String,
    /// Find the master through these sentinels instead of `url`, and follow failovers.
    pub sentinel: Option<SentinelOptions>,
    pub password: Option<String>,
    pub db: i64,
    /// Multiplexed connections used round-robin by request traffic.
    pub pool_size: usize,
    pub tls: RedisTls,
    /// Storage root prefix (`storage.redis.key_prefix`, e.g. `tunnox`) for keys that are not
    /// about mappings, such as the node registry.
    pub root_prefix: String,
    /// Key prefix of the mapping store, e.g. `tunnox:http_domain`.
    pub prefix: String,
    pub events_channel: Option<String>,
    /// Approximate cap of the change log (`XADD MAXLEN ~`).
    pub changes_max_len: u64,
    /// Events buffered per subscriber before it is told it lagged.
    pub subscription_buffer: usize,
    /// Recorded as `creator_node_id` on mappings this process creates.
    pub node_id: String,
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
    /// Mutations wait (`WAIT`) until this many replicas have them; 0 does not wait.
    pub wait_replicas: u32,
    /// How long a mutation waits for those replicas before it is reported as failed.
    pub wait_timeout: Duration,
}

impl RedisOptions {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            sentinel: None,
            password: None,
            db: 0,
            pool_size: 4,
            tls: RedisTls::default(),
            root_prefix: "tunnox".to_string(),
            prefix: "tunnox:http_domain".to_string(),
            events_channel: None,
            changes_max_len: 100_000,
            subscription_buffer: 1000,
            node_id: String::new(),
            response_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
        }
    }
}

/// TLS material from the files named in the options, or `None` when none are named (then
/// `rediss://` trusts the built-in web PKI roots).
fn certificates(tls: &RedisTls) -> Result<Option<redis::TlsCertificates>, StoreError> {
    if tls.ca_file.is_none() && tls.cert_file.is_none() {
        return Ok(None);
    }
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| StoreError::Persist {
            path: p.clone(),
            detail: format!("cannot read TLS file: {e}"),
        })
    };
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        (None, None) => None,
        _ => {
            return Err(StoreError::Corrupt {
                at: "storage.redis.tls".into(),
                detail: "cert_file and key_file must be set together".into(),
            });
        }
    };
    let root_cert = tls.ca_file.as_ref().map(read).transpose()?;
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// TCP settings of every connection to Redis: `TCP_NODELAY`, so a small command is never held
/// back by Nagle's algorithm waiting for the server's delayed ACK (up to 40 ms). The client's
/// default leaves it off; Redis sets it on its side.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// A client for the one server named by `url`: plain `host:port` means `redis://`.
pub(super) fn direct_client(opts: &RedisOptions) -> Result<redis::Client, StoreError> {
    let url = if opts.url.contains("://") {
        opts.url.clone()
    } else {
        format!("redis://{}", opts.url)
    };
    let info = url.as_str().into_connection_info()?;
    let mut settings = info.redis_settings().clone().set_db(opts.db);
    if let Some(pw) = opts.password.as_deref().filter(|p| !p.is_empty()) {
        settings = settings.set_password(pw);
    }
    let info = info
        .set_redis_settings(settings)
        .set_tcp_settings(tcp_settings());
    Ok(match certificates(&opts.tls)? {
        None => redis::Client::open(info)?,
        Some(certs) => redis::Client::build_with_tls(info, certs)?,
    })
}

/// A sentinel address as the client takes it: plain `host:port` means `redis://`.
pub(super) fn sentinel_addr(raw: &str) -> Result<ConnectionAddr, redis::RedisError> {
    let url = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("redis://{raw}")
    };
    Ok(url.as_str().into_connection_info()?.addr().clone())
}

/// The client that asks the sentinels which server is the master (and checks with `ROLE`
/// that it is one). TLS material from `storage.redis.tls` serves both the sentinels reached
/// through `rediss://` and, with `sentinel.tls`, the master.
pub(super) fn sentinel_client(
    opts: &RedisOptions,
    sentinel: &SentinelOptions,
) -> Result<SentinelClient, StoreError> {
    let addrs = sentinel
        .addrs
        .iter()
        .map(|a| sentinel_addr(a))
        .collect::<Result<Vec<_>, _>>()?;
    let to_sentinels_tls = addrs
        .iter()
        .any(|a| matches!(a, ConnectionAddr::TcpTls { .. }));
    let certs = certificates(&opts.tls)?;
    let mut b =
        SentinelClientBuilder::new(addrs, &sentinel.master_name, SentinelServerType::Master)?
            .set_client_to_redis_db(opts.db)
            .set_client_to_redis_tcp_settings(tcp_settings())
            .set_client_to_sentinel_tcp_settings(tcp_settings());
    if let Some(pw) = opts.password.as_deref().filter(|p| !p.is_empty()) {
        b = b.set_client_to_redis_password(pw);
    }
    if let Some(pw) = sentinel.password.as_deref().filter(|p| !p.is_empty()) {
        b = b.set_client_to_sentinel_password(pw);
    }
    if sentinel.tls {
        b = b.set_client_to_redis_tls_mode(TlsMode::Secure);
        if let Some(c) = &certs {
            b = b.set_client_to_redis_certificates(c.clone());
        }
    }
    if to_sentinels_tls && let Some(c) = certs {
        b = b.set_client_to_sentinel_certificates(c);
    }
    Ok(b.build()?)
}

/// Settings of every connection manager. Behind sentinels a manager gives up on a dead server
/// after one reconnect attempt: asking the sentinels for the new master is the real cure, and
/// requests should not queue behind retries to an address that is gone.
pub(super) fn manager_config(opts: &RedisOptions) -> ConnectionManagerConfig {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(opts.response_timeout))
        .set_connection_timeout(Some(opts.connect_timeout))
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(5));
    if opts.sentinel.is_some() {
        config.set_number_of_retries(1)
    } else {
        config
    }
}
