//! `TunnelSet` (`ts`): the tunnels one tunnel client exposes, its credentials and placement.
//! Types only; reconciliation is the controller's.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Placement, SecretKeyRef};

/// The TCP and UDP services one `tunnox agent` publishes on remote ports of its proxy set.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tunnox.net",
    version = "v1alpha1",
    kind = "TunnelSet",
    plural = "tunnelsets",
    singular = "tunnelset",
    shortname = "ts",
    category = "tunnox",
    namespaced,
    status = "TunnelSetStatus",
    printcolumn(name = "Client", type_ = "string", json_path = ".spec.clientId"),
    printcolumn(name = "Set", type_ = "string", json_path = ".status.set"),
    printcolumn(name = "Online", type_ = "boolean", json_path = ".status.online"),
    printcolumn(name = "Tunnels", type_ = "integer", json_path = ".status.tunnelCount"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".status.node",
        priority = 1
    ),
    printcolumn(
        name = "Serving",
        type_ = "string",
        json_path = ".status.servingSet",
        priority = 1
    ),
    printcolumn(
        name = "Config-Hash",
        type_ = "string",
        json_path = ".status.configHash",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TunnelSetSpec {
    /// Id the agent authenticates as; unique in the cluster.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9]([-_.a-zA-Z0-9]{0,126}[a-zA-Z0-9])?$"))]
    pub client_id: String,
    /// Where the agent's token is kept.
    pub auth: TunnelAuth,
    /// Proxy set serving this client (the business's DR set takes over when it is down).
    pub placement: Placement,
    /// Load-balancing groups this client serves for HTTP mappings in this namespace
    /// (`HTTPDomainMapping.spec.target.tunnel.group`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")), extend("x-kubernetes-list-type" = "set"))]
    pub groups: Vec<String>,
    /// Services published through the tunnel; names are unique (a list-map keyed by name, which
    /// the API server enforces).
    #[serde(default)]
    #[schemars(length(max = 256), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub tunnels: Vec<Tunnel>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TunnelAuth {
    /// Secret holding the client's token.
    pub secret_ref: SecretKeyRef,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TunnelProtocol {
    #[default]
    Tcp,
    Udp,
}

/// One published service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.udpSessionTimeoutSeconds) || self.type == 'udp'").message("udpSessionTimeoutSeconds applies to udp tunnels only"))]
#[x_kube(validation = Rule::new("!has(self.balance) || has(self.group)").message("balance applies to tunnels in a group only"))]
pub struct Tunnel {
    /// Unique within the TunnelSet.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub name: String,
    #[serde(rename = "type", default)]
    pub protocol: TunnelProtocol,
    /// Host the agent connects to, e.g. `localhost`.
    #[schemars(length(min = 1, max = 253))]
    pub local_host: String,
    #[schemars(range(min = 1, max = 65535))]
    pub local_port: i32,
    /// Port published on the proxy set; omit to take one from the configured range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub remote_port: Option<i32>,
    /// Load-balancing group this tunnel belongs to: tunnels of TunnelSets in this namespace
    /// with the same group and `remotePort` (required) share the port; connections are spread
    /// over the members whose agents are online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub group: Option<String>,
    /// How a group spreads connections: `roundRobin` (default) or `leastConnections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<crate::domain::Balance>,
    /// Most concurrent connections (TCP) or sessions (UDP); unlimited when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<i32>,
    /// Bandwidth cap in bytes per second, both directions and all connections together, on each
    /// proxy of the set; unlimited when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 107374182400_i64))]
    pub max_bytes_per_second: Option<i64>,
    /// Probed by the agent next to the service (frp's `healthCheck`): while it fails, this
    /// tunnel takes no new connections and its group's other members carry them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<TunnelHealthCheck>,
    /// Idle time after which a UDP session is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub udp_session_timeout_seconds: Option<i32>,
}

/// A health check of a tunnel's local service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.path) || self.type == 'http'").message("path applies to http checks only"))]
pub struct TunnelHealthCheck {
    /// `tcp` (a connection) or `http` (`GET path` answered 2xx or 3xx).
    #[serde(rename = "type")]
    pub kind: crate::domain::CheckKind,
    /// HTTP: the path asked for (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/[!-~]*$"), length(max = 1024))]
    pub path: Option<String>,
    /// Seconds between probes (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub interval_seconds: Option<i32>,
    /// Seconds a probe may take (default 3, at most the interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: Option<i32>,
    /// Failures in a row before the service counts as down (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_failed: Option<i32>,
}

impl TunnelHealthCheck {
    /// The check as proxies push it, defaults filled in.
    pub fn to_check(&self) -> crate::domain::HealthCheck {
        use crate::domain::health;
        let secs = |v: Option<i32>, d: u64| {
            v.and_then(|s| u64::try_from(s).ok())
                .map_or(d, |s| s * 1000)
        };
        crate::domain::HealthCheck {
            kind: self.kind,
            path: self.path.clone(),
            interval_ms: secs(self.interval_seconds, health::DEFAULT_INTERVAL_MS),
            timeout_ms: secs(self.timeout_seconds, health::DEFAULT_TIMEOUT_MS),
            max_failed: self
                .max_failed
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(health::DEFAULT_MAX_FAILED),
        }
    }
}

/// Runtime state of the client's session and tunnels.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TunnelSetStatus {
    #[serde(default)]
    pub online: bool,
    /// Proxy node holding the client's session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Proxy set the client is placed on (its home set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
    /// The set serving the client now, from the proxies' registry: its home set, or its
    /// business's DR set while home has no healthy proxy; absent when none does (condition
    /// `ServedByHome`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_set: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<Time>,
    /// Configuration hash the client acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    #[serde(default)]
    pub tunnel_count: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tunnels: Vec<TunnelStatus>,
    /// Address of the Service publishing the remote ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The client id whose credential (token hash) this TunnelSet has written to the store;
    /// absent while it is not `Accepted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// `Accepted` (the credential is in the store; `False` with `SecretNotFound`,
    /// `SecretKeyMissing`, `InvalidToken`, `ClientIdConflict` or `InvalidPlacement`) and
    /// `Online` (live sessions as of the last reconcile).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TunnelStatus {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<i32>,
    /// `Listening` (claimed; no proxy of the set reported it cannot listen), `Rejected` (the
    /// agent refuses it), `Unhealthy` (its health check fails), `Conflict` (held
    /// by another TunnelSet), `BindFailed`, `Exhausted` (no free port in the range), `Invalid`
    /// or `Pending`.
    #[serde(default)]
    pub state: String,
    /// Why, when the state is not `Listening`: the holder, the proxy and its error, the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub connections: i64,
    #[serde(default)]
    pub bytes_in: i64,
    #[serde(default)]
    pub bytes_out: i64,
}
