//! Connecting to Redis: addresses, credentials, TLS, connection manager settings.

use std::path::PathBuf;
use std::time::Duration;

use redis::IntoConnectionInfo;
use redis::aio::ConnectionManagerConfig;

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

#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `host:port`, `redis://…` or `rediss://…` (TLS).
    pub url: String,
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
}

impl RedisOptions {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
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
        }
    }
}

/// Builds a client from the options: plain `host:port` means `redis://`.
pub(super) fn client(opts: &RedisOptions) -> Result<redis::Client, StoreError> {
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
    let info = info.set_redis_settings(settings);
    let tls = &opts.tls;
    if tls.ca_file.is_none() && tls.cert_file.is_none() {
        return Ok(redis::Client::open(info)?);
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
    Ok(redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )?)
}

pub(super) fn manager_config(opts: &RedisOptions) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(opts.response_timeout))
        .set_connection_timeout(Some(opts.connect_timeout))
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(5))
}
