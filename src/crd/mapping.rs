//! `HTTPDomainMapping` (`hdm`): an external hostname routed to a Service, an address, or a
//! service behind a tunnel agent. Types only; the controller owns the logic.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Phase, Placement};

/// Routes `subdomain.baseDomain` to a target. The domain is claimed atomically across the
/// cluster: when another mapping already holds it, this one reports `Conflict` and names the
/// holder, and gets the domain by itself once the holder goes away.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tunnox.net",
    version = "v1alpha1",
    kind = "HTTPDomainMapping",
    plural = "httpdomainmappings",
    singular = "httpdomainmapping",
    shortname = "hdm",
    category = "tunnox",
    namespaced,
    status = "HTTPDomainMappingStatus",
    printcolumn(
        name = "Domain",
        type_ = "string",
        json_path = ".status.fullDomain",
        description = "Full domain served"
    ),
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".status.target",
        description = "Where requests go"
    ),
    printcolumn(
        name = "Set",
        type_ = "string",
        json_path = ".status.set",
        description = "Proxy set it is placed on"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Proxies",
        type_ = "string",
        json_path = ".status.proxies",
        description = "Healthy proxies of the serving set that applied this version, of all of them"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Claimed-By",
        type_ = "string",
        json_path = ".status.claimedBy",
        priority = 1,
        description = "Holder of the domain on conflict"
    ),
    printcolumn(
        name = "Mapping-ID",
        type_ = "string",
        json_path = ".status.mappingId",
        priority = 1
    ),
    printcolumn(
        name = "Version",
        type_ = "integer",
        json_path = ".status.version",
        priority = 1
    ),
    printcolumn(
        name = "Serving",
        type_ = "string",
        json_path = ".status.servingSet",
        priority = 1,
        description = "Proxy set serving it now (home, or DR while home is down)"
    ),
    printcolumn(
        name = "TLS",
        type_ = "string",
        json_path = ".status.certificate.state",
        priority = 1,
        description = "Ready, or why the certificate is not served"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct HTTPDomainMappingSpec {
    /// Left part of the domain, e.g. `myapp` (may contain dots: `api.team`). Lower case.
    #[schemars(
        regex(
            pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
        ),
        length(min = 1, max = 190)
    )]
    pub subdomain: String,
    /// Base domain, e.g. `tunnox.net`; must be one of the controller's allowed base domains.
    #[schemars(
        regex(
            pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
        ),
        length(min = 1, max = 253)
    )]
    pub base_domain: String,
    /// Where requests for the domain go: exactly one of `service`, `address`, `tunnel`.
    pub target: Target,
    /// Scheme used towards the target.
    #[serde(default)]
    pub scheme: TargetScheme,
    /// Proxy set serving this mapping; tunnel targets take their client's TunnelSet placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Owner for per-owner quotas and listing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// Headers added to every proxied request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_headers: BTreeMap<String, String>,
    /// TLS for the external hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MappingTls>,
    /// When the mapping stops being served and its domain is released (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 1024))]
    pub description: String,
}

impl HTTPDomainMappingSpec {
    /// `subdomain.base_domain` → `target`, everything else at its default.
    pub fn new(subdomain: &str, base_domain: &str, target: Target) -> Self {
        Self {
            subdomain: subdomain.into(),
            base_domain: base_domain.into(),
            target,
            scheme: TargetScheme::Http,
            placement: None,
            owner: None,
            custom_headers: BTreeMap::new(),
            tls: None,
            expires_at: None,
            description: String::new(),
        }
    }
}

impl Target {
    pub fn service(name: &str, port: i32) -> Self {
        Self {
            protocol: None,
            tls: None,
            service: Some(ServiceTarget {
                name: name.into(),
                port,
            }),
            address: None,
            tunnel: None,
        }
    }

    pub fn address(host: &str, port: i32) -> Self {
        Self {
            protocol: None,
            tls: None,
            service: None,
            address: Some(AddressTarget {
                host: host.into(),
                port,
            }),
            tunnel: None,
        }
    }
}

/// Exactly one kind of target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.service), has(self.address), has(self.tunnel)].filter(x, x).size() == 1").message("exactly one of service, address or tunnel must be set"))]
pub struct Target {
    /// A Service in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceTarget>,
    /// A host and port the proxies can reach directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<AddressTarget>,
    /// A service behind a `tunnox agent` (its TunnelSet supplies credentials and placement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelTarget>,
    /// How the proxies speak to a service or address target: `http1` (default), `h2c`
    /// (HTTP/2 without TLS, e.g. a gRPC server's plain port) or `h2` (HTTP/2 over TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<crate::domain::Protocol>,
    /// TLS to the target (`spec.scheme: https` or `protocol: h2`): verified with the public
    /// roots unless a CA is named here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TargetTls>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.caSecretName) && self.insecureSkipVerify)").message("caSecretName and insecureSkipVerify exclude each other"))]
pub struct TargetTls {
    /// A Secret in this namespace whose `ca.crt` holds the CA certificates (PEM) the target's
    /// certificate is verified with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"))]
    pub ca_secret_name: Option<String>,
    /// Do not verify the target's certificate at all (shown in the `Accepted` condition).
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceTarget {
    /// Name of the Service.
    #[schemars(regex(pattern = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub name: String,
    /// Service port number.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddressTarget {
    /// Hostname or IP address.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.clientId) != has(self.group)").message("exactly one of clientId or group must be set"))]
#[x_kube(validation = Rule::new("!has(self.balance) || has(self.group)").message("balance applies to a group only"))]
pub struct TunnelTarget {
    /// Tunnel client (its TunnelSet's `clientId`) that carries the traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-zA-Z0-9]([-_.a-zA-Z0-9]{0,126}[a-zA-Z0-9])?$"))]
    pub client_id: Option<String>,
    /// A load-balancing group: the clients whose TunnelSet in this namespace lists it in
    /// `spec.groups`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub group: Option<String>,
    /// How a group spreads requests: `roundRobin` (default) or `leastConnections` (fewest
    /// requests in flight through this proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<crate::domain::Balance>,
    /// Host as seen from the agent, e.g. `localhost`.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TargetScheme {
    #[default]
    Http,
    Https,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    /// User id the mapping counts against.
    #[schemars(length(min = 1, max = 128))]
    pub user_id: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'secret' || has(self.secretName)").message("mode secret needs secretName"))]
pub struct MappingTls {
    /// Where the certificate comes from: `secret` (default: `secretName`) or `acme` (ordered
    /// by the controller from its ACME server, HTTP-01, renewed before expiry; annotate
    /// `tunnox.net/renew-certificate` with a new value to renew now).
    #[serde(default)]
    pub mode: TlsMode,
    /// Secret (type kubernetes.io/tls, in this namespace) with the certificate for the domain,
    /// e.g. one cert-manager writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"))]
    pub secret_name: Option<String>,
    /// Plain HTTP requests are answered `308` to the same URL over HTTPS.
    #[serde(default, rename = "redirectHTTP")]
    pub redirect_http: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Secret,
    Acme,
}

/// The certificate the proxies serve for the domain, as the controller last checked it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// `Ready`, or why not (the `CertificateReady` condition's reason).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// DNS names the certificate covers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

/// What the controller did with the mapping.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPDomainMappingStatus {
    /// Store id of the programmed record (`hdm_<ulid>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping_id: Option<String>,
    /// `subdomain.baseDomain`, normalised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_domain: Option<String>,
    /// Resolved target, e.g. `web.team-a.svc.cluster.local:80` or `tunnel:laptop/localhost:3000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Proxy set the mapping is placed on (`any`: every set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
    /// A placed mapping: the set serving it now, from the proxies' registry — its home set, or
    /// its business's DR set while home has no healthy proxy; absent when none serves it
    /// (condition `ServedByHome`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_set: Option<String>,
    #[serde(default)]
    pub phase: Phase,
    /// `N/M` while `Active`: N of the M healthy proxies of the serving set have applied
    /// `version` (`Ready` is True only at M/M, with M > 0). Written when the mapping becomes
    /// served or while it is not; a served mapping keeps its count as the fleet grows or shrinks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxies: Option<String>,
    /// `namespace/name` of the mapping holding the domain when the phase is `Conflict`;
    /// `cluster/namespace/name` when the holder is in another cluster sharing the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    /// Store version at which the record was programmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` and `Ready`, each with its observedGeneration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Access statistics, flushed periodically by the proxies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<AccessStats>,
    /// With `spec.tls`: the certificate served, or why none is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessStats {
    pub access_count: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_access_at: Option<Time>,
}
