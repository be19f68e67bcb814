//! The configuration model (seed 000 §6.3, seed 001, ARCHITECTURE §9). Every section has
//! defaults, so an empty file is a working single-node configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::Dur;
use crate::domain::{Hostname, Scheme, SetName};

/// Strings that YAML might read as numbers or booleans (passwords, addresses).
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::S(s) => s,
        Raw::I(i) => i.to_string(),
        Raw::U(u) => u.to_string(),
        Raw::F(f) => f.to_string(),
        Raw::B(b) => b.to_string(),
    })
}

/// A `host:port` socket address; the error quotes what was given.
fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let raw = lenient_string(d)?;
    raw.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{raw:?} is not an IP address with a port, e.g. 0.0.0.0:8080 or 127.0.0.1:9090"
        ))
    })
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub storage: StorageConfig,
    pub message_broker: BrokerConfig,
    pub http_domain: HttpDomainConfig,
    pub proxy: ProxyConfig,
    pub controller: ControllerConfig,
    pub log: LogConfig,
    /// Where mappings may send traffic (docs/security.md).
    pub egress: EgressConfig,
    /// Single-node only: mappings declared in the file.
    pub mappings: Vec<MappingEntry>,
    /// Single-node only: the tunnel clients the proxy admits.
    pub tunnel_clients: Vec<super::TunnelClientEntry>,
    /// `tunnox agent`.
    pub agent: super::AgentConfig,
    /// The management API (`/api/v1/…`): the controller serves it in a cluster, the proxy in
    /// single-node mode.
    pub api: super::ApiConfig,
}

/// The egress policy's operator-set part. Tenants' targets are refused when they are loopback,
/// link-local (metadata), unspecified, multicast or broadcast, a Service of another namespace
/// named through `address`, or the proxy's own listeners; `allow` opens what the operator
/// permits (never the proxy's own listeners), `deny` closes more.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// CIDRs or addresses (optionally `:port`; IPv6 as `[net]:port`), host names or
    /// `*.suffix` patterns (optionally `:port`).
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    /// The Kubernetes cluster domain, for recognising Service names.
    pub cluster_domain: String,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            deny: Vec::new(),
            cluster_domain: "cluster.local".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageType {
    /// Memory only (single node), optionally persisted to the JSON file.
    Memory,
    /// Seed 001 default: memory cache, upgraded to Redis when a Redis address is configured.
    #[default]
    Hybrid,
    /// Redis (multi-node).
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheType {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    #[serde(rename = "type")]
    pub kind: StorageType,
    pub redis: RedisConfig,
    pub hybrid: HybridConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `host:port`, `redis://host:port` or `rediss://host:port` (TLS). Empty: not configured.
    #[serde(deserialize_with = "lenient_string")]
    pub addr: String,
    #[serde(deserialize_with = "lenient_string")]
    pub password: String,
    /// A file holding the password (a mounted Secret), read at start; trailing newlines are
    /// dropped. Excludes `password`.
    pub password_file: Option<PathBuf>,
    pub db: i64,
    pub pool_size: usize,
    /// Prefix of every tunnox key. Use a hash tag (`{tunnox}`) on Redis Cluster.
    #[serde(deserialize_with = "lenient_string")]
    pub key_prefix: String,
    pub tls: RedisTlsConfig,
    pub response_timeout: Dur,
    pub connect_timeout: Dur,
    /// Find the master through Redis Sentinel instead of `addr`, and follow its failovers.
    pub sentinel: SentinelConfig,
    /// Mutations wait (`WAIT`) until this many replicas have them before they are reported
    /// done, so a failover cannot lose them; 0 does not wait (asynchronous replication).
    pub wait_replicas: u32,
    /// How long a mutation waits for `wait_replicas`; fewer in time fails the mutation (the
    /// controller retries). Shorter than `response_timeout`.
    pub wait_timeout: Dur,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            addr: String::new(),
            password: String::new(),
            password_file: None,
            db: 0,
            pool_size: 10,
            key_prefix: "tunnox".into(),
            tls: RedisTlsConfig::default(),
            response_timeout: Dur::secs(2),
            connect_timeout: Dur::secs(2),
            sentinel: SentinelConfig::default(),
            wait_replicas: 0,
            wait_timeout: Dur::millis(500),
        }
    }
}

impl RedisConfig {
    /// Redis is configured, by address or through sentinels.
    pub fn is_configured(&self) -> bool {
        !self.addr.is_empty() || self.sentinel.is_set()
    }
}

/// Redis Sentinel: the sentinels to ask for the master named `master_name`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SentinelConfig {
    /// The name the sentinels monitor the master under. Empty: no sentinel.
    #[serde(deserialize_with = "lenient_string")]
    pub master_name: String,
    /// `host:port`, `redis://host:port` or `rediss://host:port` (TLS) of each sentinel.
    pub addrs: Vec<String>,
    /// The sentinels' own password (`requirepass` in sentinel.conf), if they require one; the
    /// master's is `storage.redis.password`.
    #[serde(deserialize_with = "lenient_string")]
    pub password: String,
    /// TLS to the master the sentinels name (with `storage.redis.tls` material).
    pub tls: bool,
}

impl SentinelConfig {
    pub fn is_set(&self) -> bool {
        !self.master_name.is_empty() || !self.addrs.is_empty()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisTlsConfig {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HybridConfig {
    /// Unset behaves as `memory` (and is upgraded by the auto-sharing rules).
    pub cache_type: Option<CacheType>,
    pub enable_persistent: bool,
    pub json: JsonConfig,
}

impl Default for HybridConfig {
    fn default() -> Self {
        Self {
            cache_type: None,
            enable_persistent: true,
            json: JsonConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JsonConfig {
    pub file_path: PathBuf,
    pub auto_save: bool,
    /// Seconds (or a duration) between background saves; 0 saves after every change.
    pub save_interval: Dur,
}

impl Default for JsonConfig {
    fn default() -> Self {
        Self {
            file_path: PathBuf::from("data/tunnox-data.json"),
            auto_save: true,
            save_interval: Dur::secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerType {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Unset behaves as `memory`.
    #[serde(rename = "type")]
    pub kind: Option<BrokerType>,
    pub redis: BrokerRedisConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerRedisConfig {
    #[serde(deserialize_with = "lenient_string")]
    pub addr: String,
    #[serde(deserialize_with = "lenient_string")]
    pub password: String,
    pub db: i64,
    #[serde(deserialize_with = "lenient_string")]
    pub channel: String,
}

impl Default for BrokerRedisConfig {
    fn default() -> Self {
        Self {
            addr: String::new(),
            password: String::new(),
            db: 0,
            channel: "tunnox:messages".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpDomainConfig {
    pub enabled: bool,
    pub base_domains: Vec<Hostname>,
    pub cache: CacheConfig,
    pub persistence: PersistenceConfig,
    pub sync: SyncConfig,
    /// Seed 000's distributed lock. Accepted for compatibility; claims are atomic, no lock is taken.
    pub lock: Option<serde_yaml::Value>,
    /// Cluster: a file (mounted from one Secret) whose text seals certificate keys in the store:
    /// the controller seals the keys it reads from Secrets, proxies open them. Without it the
    /// controller publishes no certificate and proxies serve none from the store.
    pub tls_store_key_file: Option<std::path::PathBuf>,
}

impl Default for HttpDomainConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            base_domains: vec![Hostname::parse("tunnox.net").expect("valid")],
            cache: CacheConfig::default(),
            persistence: PersistenceConfig::default(),
            sync: SyncConfig::default(),
            lock: None,
            tls_store_key_file: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub local: LocalCacheConfig,
    /// Seed 000's L2 Redis cache. Accepted for compatibility; the Redis store is the shared layer.
    pub shared: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalCacheConfig {
    pub enabled: bool,
    pub ttl: Dur,
    pub max_size: usize,
    /// How long an unknown host is remembered as unknown.
    pub negative_ttl: Dur,
    /// How many unknown hosts are remembered, apart from `max_size` (a flood of unknown hosts
    /// never evicts a route).
    pub negative_max_size: usize,
}

impl Default for LocalCacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl: Dur::secs(60),
            max_size: 10_000,
            negative_ttl: Dur::secs(5),
            negative_max_size: 10_000,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersistenceConfig {
    /// Prefix of the mapping keys; default `<storage.redis.key_prefix>:http_domain`.
    pub key_prefix: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Pub/sub channel of change events; default `<key_prefix>:events`.
    pub channel: Option<String>,
    /// Events buffered per subscriber before it is told it lagged (and catches up).
    pub buffer_size: usize,
    /// How often a subscriber checks the change log even without a nudge.
    pub check_interval: Dur,
    /// Approximate length of the change log (older entries are trimmed).
    pub changes_max_len: u64,
    /// How long a proxy keeps serving its own (stale) table after the store lost history,
    /// waiting for the controller's "rebuilt" marker, before it takes what the store holds.
    pub rebuild_wait: Dur,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            channel: None,
            buffer_size: 1000,
            check_interval: Dur::secs(5),
            changes_max_len: 100_000,
            rebuild_wait: Dur::secs(600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    #[serde(deserialize_with = "socket_addr")]
    pub admin_listen: SocketAddr,
    /// A file holding the bearer token that state-changing admin endpoints (`/drain`) accept
    /// (a mounted Secret), read at start. Without it only loopback clients may drain.
    pub admin_token_file: Option<PathBuf>,
    /// Whether a client connecting over loopback (the preStop hook in the pod) may drain
    /// without the token. `false`: the token is required from everyone.
    pub admin_trust_loopback: bool,
    pub set: SetName,
    /// Node id in the registry; default `$POD_NAME`, else the host name.
    pub node_id: Option<String>,
    /// `host:port` peers reach this node on; default `$POD_IP` with the listen port, else the
    /// listen address.
    pub advertise_address: Option<String>,
    /// Request-handling threads; 0 means one per CPU.
    pub worker_threads: usize,
    /// Relay plain HTTP/1.1 requests on the fast path (docs/proxy.md); `false` sends every
    /// request through the general path.
    pub fast_path: bool,
    pub timeouts: ProxyTimeouts,
    pub limits: ProxyLimits,
    pub drain: DrainConfig,
    pub registry: RegistryConfig,
    /// How often aggregated access statistics are written to the store.
    pub stats_flush_interval: Dur,
    /// Where `tunnox agent`s connect.
    pub tunnel: super::TunnelListenerConfig,
    /// The HTTPS listener, e.g. `0.0.0.0:8443`; `None`: none.
    pub tls_listen: Option<SocketAddr>,
    /// What the HTTPS listener serves besides the mappings' own certificates.
    pub tls: super::ProxyTlsConfig,
    /// Single-node: the ACME server certificates are ordered from for mappings with
    /// `tls: {acme: true}`, kept as files in its `state_dir`.
    pub acme: Option<AcmeConfig>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("valid"),
            admin_listen: "127.0.0.1:9090".parse().expect("valid"),
            admin_token_file: None,
            admin_trust_loopback: true,
            set: SetName::parse("default.default").expect("valid"),
            node_id: None,
            advertise_address: None,
            worker_threads: 0,
            fast_path: true,
            timeouts: ProxyTimeouts::default(),
            limits: ProxyLimits::default(),
            drain: DrainConfig::default(),
            registry: RegistryConfig::default(),
            stats_flush_interval: Dur::secs(5),
            tunnel: super::TunnelListenerConfig::default(),
            tls_listen: None,
            tls: super::ProxyTlsConfig::default(),
            acme: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyTimeouts {
    /// Connecting to an upstream (then 502).
    pub connect: Dur,
    /// From connection start (or the previous request) until a client has sent its headers.
    pub request_header: Dur,
    /// Waiting for an upstream's response headers (then 504).
    pub upstream_response: Dur,
    /// Idle upstream keep-alive connections are closed after this.
    pub upstream_idle: Dur,
    /// A client that takes no byte of its response for this long is disconnected (and the
    /// upstream connection closed).
    pub client_write_idle: Dur,
    /// An upstream that sends no byte of a response body it started for this long: the client
    /// connection is closed (the response cannot be completed).
    pub upstream_read_idle: Dur,
    /// A client that sends no byte of a request body it started for this long is disconnected.
    pub request_body_idle: Dur,
    /// A WebSocket (any upgraded connection) with no byte either way for this long is closed.
    pub websocket_idle: Dur,
    /// An HTTP/2 client connection without an open stream for this long is closed (GOAWAY).
    pub http2_idle: Dur,
}

impl Default for ProxyTimeouts {
    fn default() -> Self {
        Self {
            connect: Dur::secs(5),
            request_header: Dur::secs(10),
            upstream_response: Dur::secs(60),
            upstream_idle: Dur::secs(90),
            client_write_idle: Dur::secs(60),
            upstream_read_idle: Dur::secs(60),
            request_body_idle: Dur::secs(60),
            websocket_idle: Dur::secs(600),
            http2_idle: Dur::secs(300),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyLimits {
    /// Largest request head (request line and headers) accepted, in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Most request headers accepted; more gets 431.
    pub max_headers: usize,
    /// Idle keep-alive connections kept per upstream.
    pub upstream_pool_max_idle: usize,
    /// Proxies of this fleet a request may pass through (`tunnox-hops`); one arriving with
    /// this many already is a loop and gets 508.
    pub max_hops: u32,
    /// Open client connections on the listener; more are closed at once.
    pub max_connections: usize,
    /// Requests of one mapping in flight at once on this proxy; more get 503 with
    /// `Retry-After` (0: no limit).
    pub mapping_concurrency: u32,
    /// Requests of one mapping per second on this proxy (`mapping_burst` at once); more get
    /// 503 with `Retry-After` (0: no rate limit).
    pub mapping_rate: f64,
    /// Requests of one mapping accepted at once under `mapping_rate`.
    pub mapping_burst: u32,
    /// Requests in flight to upstreams at once on this proxy (each holds one upstream
    /// connection over HTTP/1.1); more get 503 with `Retry-After` (0: no limit).
    pub upstream_requests: usize,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            upstream_pool_max_idle: 64,
            max_hops: 3,
            max_connections: 10_000,
            mapping_concurrency: 1_000,
            mapping_rate: 0.0,
            mapping_burst: 100,
            upstream_requests: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// How long `/drain` waits, once not ready, for load balancers to stop sending (unless the
    /// request says `?wait=`).
    pub propagation_delay: Dur,
    /// After SIGTERM, how long in-flight requests may take before connections are closed.
    pub grace_period: Dur,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            propagation_delay: Dur::secs(5),
            grace_period: Dur::secs(25),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// How often the node record is refreshed.
    pub heartbeat_interval: Dur,
    /// A node record not refreshed for this long disappears.
    pub ttl: Dur,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Dur::secs(5),
            ttl: Dur::secs(15),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    #[serde(deserialize_with = "socket_addr")]
    pub admin_listen: SocketAddr,
    /// Identity in the leader-election Lease; default `$POD_NAME`, else `<hostname>-<pid>`.
    pub identity: Option<String>,
    /// Namespace of the Lease; default `$POD_NAMESPACE`, else `default`.
    pub lease_namespace: Option<String>,
    pub lease_name: String,
    /// A leader that has not renewed for this long is replaced.
    pub lease_duration: Dur,
    /// How often the leader renews (and a standby retries).
    pub renew_interval: Dur,
    /// How often a mapping with `spec.tls` reads its Secret again: a renewed certificate
    /// reaches new handshakes within about this long (one Secret read per TLS mapping per
    /// interval; the controller is granted `get`, not `list`/`watch`, on Secrets).
    pub tls_recheck_interval: Dur,
    /// How often every mapping is compared with Redis and repaired (anti-entropy).
    pub resync_interval: Dur,
    /// How often a mapping in `Conflict` checks again, besides being woken when the holder goes.
    pub conflict_retry: Dur,
    /// Mappings reconciled at once. Bounded so a cold start with many mappings cannot flood the
    /// API server and starve the leader's own lease renewals.
    pub concurrency: u16,
    /// Programmed mappings allowed per namespace and per owner, counted by the store in the
    /// same atomic step as the domain claim.
    pub quota: QuotaConfig,
    /// This cluster's name in record sources (`k8s:<cluster_id>/<namespace>/<name>`), so that
    /// clusters sharing one Redis never take each other's records for their own; default the
    /// uid of the `kube-system` namespace, read at start.
    pub cluster_id: Option<String>,
    /// Remote ports TunnelSets may claim on their proxy set, inclusive: an explicit
    /// `remotePort` outside it is refused; `auto` takes the lowest free one.
    pub remote_port_range: [u16; 2],
    /// A Service per TunnelSet in the controller's namespace, exposing its claimed remote ports
    /// on the proxy pods of its set.
    pub tunnel_service: TunnelServiceConfig,
    /// Certificates issued through ACME for mappings with `spec.tls.mode: acme`; off unless
    /// a directory is named.
    pub acme: Option<AcmeConfig>,
}

/// `controller.acme` (the ACME server the leader orders certificates from) or, single-node,
/// `proxy.acme`: HTTP-01 challenges answered by every proxy from the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcmeConfig {
    /// The directory URL, e.g. Let's Encrypt's production or staging directory.
    pub directory_url: String,
    /// The account's contact (`mailto:` is added).
    pub email: Option<String>,
    /// A PEM file of CA certificates to trust for the directory's own TLS (a private ACME
    /// server); default the system roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Controller: namespace of the account Secret and of the issued certificates' Secrets;
    /// default `$POD_NAMESPACE`, else `default`.
    pub namespace: Option<String>,
    /// Controller: the Secret holding the account's credentials (created at first use).
    pub account_secret: String,
    /// Single-node: the directory holding the account (`account-<hash>.json`) and the issued
    /// certificates (`<domain>.crt`, `<domain>.key`, `<domain>.json`); default `data/acme`.
    pub state_dir: Option<std::path::PathBuf>,
    /// Single-node: how often the certificates in `state_dir` are checked (one removed or
    /// damaged is ordered again); default 1m.
    pub check_interval: Option<Dur>,
    /// How long a challenge answer stays in the store.
    pub challenge_ttl: Dur,
    /// How long one order may take, from creation to the downloaded certificate.
    pub order_timeout: Dur,
    /// The longest wait between two failed attempts for a domain (they start at 1 minute,
    /// ×1.5 each; a CA's rate limit waits this long at once).
    pub retry_max: Dur,
    /// The least time between two orders for one domain: a renewal asked for by annotation,
    /// or a certificate the controller cannot serve, waits this long after the last issuance.
    pub min_reorder_interval: Dur,
    /// Orders started per hour at most, all domains together (the CA's limits are per
    /// account and per registered domain: one tenant must not spend them for all).
    pub max_orders_per_hour: u32,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        Self {
            directory_url: String::new(),
            email: None,
            ca_file: None,
            namespace: None,
            account_secret: "tunnox-acme-account".into(),
            state_dir: None,
            check_interval: None,
            challenge_ttl: Dur::secs(600),
            order_timeout: Dur::secs(120),
            retry_max: Dur::secs(3600),
            min_reorder_interval: Dur::secs(3600),
            max_orders_per_hour: 100,
        }
    }
}

impl AcmeConfig {
    /// Single-node: where the account and the certificates are kept.
    pub fn state_dir(&self) -> std::path::PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from("data/acme"))
    }

    /// Single-node: how often the certificates are checked.
    pub fn check_interval(&self) -> std::time::Duration {
        self.check_interval
            .map_or(std::time::Duration::from_secs(60), |d| d.get())
    }
}

/// `controller.tunnel_service`: the Service publishing a TunnelSet's remote ports.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelServiceConfig {
    pub enabled: bool,
    /// `ClusterIP`, `NodePort` or `LoadBalancer`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Labels of the proxy pods (the chart's); the set's `tunnox.net/set` label is added.
    pub selector: std::collections::BTreeMap<String, String>,
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl Default for TunnelServiceConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            kind: "ClusterIP".into(),
            selector: std::collections::BTreeMap::new(),
            annotations: std::collections::BTreeMap::new(),
        }
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            admin_listen: "127.0.0.1:9091".parse().expect("valid"),
            identity: None,
            lease_namespace: None,
            lease_name: "tunnox-controller".into(),
            lease_duration: Dur::secs(15),
            renew_interval: Dur::secs(5),
            resync_interval: Dur::secs(30),
            tls_recheck_interval: Dur::secs(5),
            conflict_retry: Dur::secs(10),
            concurrency: 16,
            quota: QuotaConfig::default(),
            cluster_id: None,
            remote_port_range: [20000, 29999],
            tunnel_service: TunnelServiceConfig::default(),
            acme: None,
        }
    }
}

/// Limits on programmed mappings; 0 means unlimited.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    pub per_namespace: usize,
    pub per_owner: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `tunnox=debug,info`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Plain,
        }
    }
}

/// A mapping declared in the file (single-node mode).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingEntry {
    pub subdomain: String,
    pub base_domain: Hostname,
    /// A `tunnel_clients` entry whose agent carries the traffic to `target_host:target_port`
    /// (seed 000's `target_client_id`); absent: the target is reached directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_client_id: Option<String>,
    /// A load-balancing group instead of one client: the `tunnel_clients` entries that list it
    /// in their `groups`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_group: Option<String>,
    /// How a group spreads requests: `round_robin` (default) or `least_connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<crate::domain::Balance>,
    pub target_host: String,
    pub target_port: u16,
    #[serde(default)]
    pub target_scheme: Scheme,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub custom_headers: std::collections::BTreeMap<String, String>,
    /// HTTPS for this domain on `proxy.tls_listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::MappingTlsEntry>,
    /// How the proxy speaks to the target: `http1` (default), `h2c` (HTTP/2 without TLS, e.g.
    /// a gRPC server) or `h2` (HTTP/2 over TLS).
    #[serde(default)]
    pub target_protocol: crate::domain::Protocol,
    /// TLS to the target (`target_scheme: https` or `target_protocol: h2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_tls: Option<TargetTlsEntry>,
}

/// A file mapping's `target_tls`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetTlsEntry {
    /// PEM CA certificates to verify the target with instead of the public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Do not verify the target's certificate at all.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// A CA bundle file, refused past [`crate::domain::upstream::MAX_CA_PEM`] without reading
/// further.
pub fn read_ca(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let max = crate::domain::upstream::MAX_CA_PEM;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max as u64 + 1).read_to_string(&mut text))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() > max {
        return Err(format!("{}: more than {max} bytes", path.display()));
    }
    Ok(text)
}

impl MappingEntry {
    /// The record's `upstream`, the CA read from its file (an unreadable file gives an empty
    /// bundle, which the record's check refuses: never the public roots instead).
    pub fn upstream(&self) -> crate::domain::Upstream {
        let tls = self.target_tls.clone().unwrap_or_default();
        crate::domain::Upstream {
            protocol: self.target_protocol,
            ca_pem: tls.ca_file.as_ref().map(|f| read_ca(f).unwrap_or_default()),
            insecure_skip_verify: tls.insecure_skip_verify,
        }
    }
}
