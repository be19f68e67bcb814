//! What the API reads and writes: types of the API alone (the OpenAPI document is generated from
//! them), converted from and to the domain's types here and nowhere else.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::domain::{Mapping, MappingStatus, Scheme};

/// A mapping's phase, spelt as `kubectl get hdm` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Phase {
    Pending,
    Active,
    Conflict,
    Rejected,
    Expired,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Pending,
        Phase::Active,
        Phase::Conflict,
        Phase::Rejected,
        Phase::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Active => "Active",
            Phase::Conflict => "Conflict",
            Phase::Rejected => "Rejected",
            Phase::Expired => "Expired",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == raw)
    }

    /// The phase of a record in the store.
    pub fn of(m: &Mapping, now: DateTime<Utc>) -> Self {
        match m.status {
            _ if m.is_expired(now) => Phase::Expired,
            MappingStatus::Active => Phase::Active,
            MappingStatus::Expired => Phase::Expired,
            MappingStatus::Inactive => Phase::Pending,
            MappingStatus::Revoked => Phase::Rejected,
        }
    }
}

/// Where a mapping sends requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct TargetView {
    pub host: String,
    pub port: u16,
    /// `http` or `https`.
    pub scheme: String,
    /// The tunnel client carrying the traffic, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The group of tunnel clients carrying the traffic, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// One mapping as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct MappingView {
    pub id: String,
    /// The full domain served: `subdomain.base_domain`.
    pub domain: String,
    pub subdomain: String,
    pub base_domain: String,
    pub target: TargetView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_user_id: Option<String>,
    /// Who declared it: `api`, `config`, `k8s:<cluster>/<namespace>/<name>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub phase: Phase,
    /// The proxy set that serves it; absent: every set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The store version of its last write.
    pub version: u64,
}

impl MappingView {
    pub fn of(m: &Mapping, now: DateTime<Utc>) -> Self {
        Self {
            id: m.mapping_id.to_string(),
            domain: m.full_domain.to_string(),
            subdomain: m.subdomain.clone(),
            base_domain: m.base_domain.to_string(),
            target: TargetView {
                host: m.target_host.clone(),
                port: m.target_port,
                scheme: scheme_name(m.target_scheme).into(),
                client_id: m.target_client_id.clone(),
                group: m.target_group.as_ref().map(|g| g.name.clone()),
            },
            owner_user_id: m.owner_user_id.clone(),
            source: m.source.clone(),
            phase: Phase::of(m, now),
            set: m.placement.as_ref().map(|s| s.to_string()),
            description: m.description.clone(),
            created_at: m.created_at,
            updated_at: m.updated_at,
            expires_at: m.expires_at,
            version: m.version,
        }
    }
}

fn scheme_name(s: Scheme) -> &'static str {
    match s {
        Scheme::Http => "http",
        Scheme::Https => "https",
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct MappingPage {
    pub items: Vec<MappingView>,
    /// Pass as `cursor` for the next page; absent on the last page. A page may hold fewer
    /// than `limit` items (even none) and still have a next one: filters are applied to a
    /// bounded number of records per page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Filters and paging of `GET /api/v1/mappings`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only mappings owned by this user id.
    #[param(pattern = r"^[!-~]{1,128}$")]
    pub user: Option<String>,
    /// Only mappings carried by this tunnel client.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    pub client: Option<String>,
    /// Only mappings placed on this proxy set (`<business>.<region>`).
    #[param(pattern = r"^[a-z0-9-]{1,63}\.([a-z0-9-]{1,63}|\*)$")]
    pub set: Option<String>,
    /// Only mappings in this phase.
    pub phase: Option<Phase>,
    /// Only domains starting with this text (lower case).
    #[param(pattern = r"^[a-z0-9.-]{0,253}$")]
    pub domain_prefix: Option<String>,
    /// Where to continue: `next_cursor` of the previous page.
    #[param(pattern = r"^hdm_[0-7][0-9A-HJKMNP-TV-Z]{25}$")]
    pub cursor: Option<String>,
    /// Items per page, 1 to 500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// What a create waits for before it answers (cluster; a single node serves at once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WaitFor {
    /// The record is in the store (`Active`).
    #[default]
    Active,
    /// Every healthy proxy of its serving set has applied it (`Ready`): a request through any
    /// of them is answered from it.
    Ready,
}

/// `POST /api/v1/mappings` options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CreateQuery {
    /// `active` (default) or `ready`.
    pub wait: Option<WaitFor>,
}

/// `DELETE /api/v1/mappings/{id}` options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Administrators only: delete whoever declared it (the configuration file, a resource),
    /// and release its domain now.
    pub force: Option<bool>,
}

/// `GET /api/v1/availability` of `subdomain.base_domain`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AvailabilityQuery {
    pub subdomain: String,
    pub base_domain: String,
}

/// Whether a domain can be claimed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Free,
    Taken,
    NotAllowed,
}

/// The holder of a taken domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Holder {
    /// Shown to administrators and to the holder's owner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// True when the caller owns the holder.
    pub yours: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Availability {
    /// The full domain, when the parts make one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    pub available: bool,
    pub verdict: Verdict,
    /// Why, for a person.
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_by: Option<Holder>,
}

/// How the proxies speak to a direct target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TargetScheme {
    Http,
    Https,
}

/// `POST /api/v1/mappings`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMapping {
    /// One or more DNS labels.
    #[schema(pattern = r"^[A-Za-z0-9.-]{1,253}$")]
    pub subdomain: String,
    /// One of the configured base domains.
    #[schema(pattern = r"^[A-Za-z0-9.-]{1,253}$")]
    pub base_domain: String,
    /// The upstream's host name or IP address (for a tunnel: as the agent reaches it).
    #[schema(pattern = r"^[A-Za-z0-9.:-]{1,253}$")]
    pub target_host: String,
    #[schema(minimum = 1, maximum = 65535)]
    pub target_port: u16,
    /// Default `http`.
    #[serde(default)]
    pub target_scheme: Option<TargetScheme>,
    /// Carry the traffic through this tunnel client.
    #[serde(default)]
    #[schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    pub target_client_id: Option<String>,
    /// Administrators only; a user's mappings are always their own.
    #[serde(default)]
    #[schema(pattern = r"^[!-~]{1,128}$")]
    pub owner_user_id: Option<String>,
    #[serde(default)]
    #[schema(max_length = 1024)]
    pub description: Option<String>,
    /// Released (and deleted) at this time.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Headers set on every proxied request.
    #[serde(default)]
    pub custom_headers: Option<BTreeMap<String, String>>,
}

/// `202 Accepted`: declared (or being deleted), not finished within the wait. Cluster mode
/// only: a single-node proxy finishes every write before it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct InProgress {
    /// The `HTTPDomainMapping` resource, `namespace/name`: `kubectl get hdm` follows it.
    pub resource: String,
    /// Why it is not finished, for a person.
    pub message: String,
}

/// A mapping's traffic, as counted by the proxies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct MappingStats {
    pub id: String,
    pub domain: String,
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_access_at: Option<DateTime<Utc>>,
}

/// The route cache of the process serving the API (single-node: the proxy itself).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CacheView {
    /// `memory` or `redis`: where mappings are shared.
    #[serde(rename = "type")]
    pub kind: String,
    pub entries: u64,
    pub max_entries: u64,
    pub hits: u64,
    pub misses: u64,
    /// hits / (hits + misses); 0 before any lookup.
    pub hit_rate: f64,
}

/// One proxy and the store version it has applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ProxyView {
    pub node_id: String,
    pub set: String,
    /// `active` or `draining`.
    pub state: String,
    pub applied_version: u64,
    pub heartbeat_at: DateTime<Utc>,
}

/// `GET /api/v1/stats/system`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct SystemStats {
    /// Absent where the API's process has no route cache (the controller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheView>,
    /// Mappings by phase (phases with none are left out).
    pub mappings: BTreeMap<String, u64>,
    pub store_version: u64,
    pub proxies: Vec<ProxyView>,
}
