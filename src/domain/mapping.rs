//! The mapping record (seed 000 §3.1): what a domain routes to, who owns it, its lifecycle.
//!
//! JSON field names are part of the Redis contract (`docs/redis-schema.md`): never rename one.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{
    Balance, Hostname, HostnameError, MappingId, MappingTls, SetName, Upstream, check_client_id,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MappingStatus {
    #[default]
    Active,
    Inactive,
    Expired,
    Revoked,
}

/// The fields a creator chooses. The store adds identity, timestamps, version and statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSpec {
    pub subdomain: String,
    pub base_domain: Hostname,
    /// Tunnel client that carries the traffic; `None` for a directly reachable target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_client_id: Option<String>,
    /// A load-balancing group of tunnel clients that carries the traffic instead of one client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_group: Option<TargetGroup>,
    pub target_host: String,
    pub target_port: u16,
    #[serde(default)]
    pub target_scheme: Scheme,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_user_id: Option<String>,
    /// Proxy set that serves this mapping; `None` means every set may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<SetName>,
    /// Who declared the mapping, e.g. `k8s:team-a/myapp`, `config` or `api`; named in conflicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub enable_https: bool,
    /// HTTPS: the certificate's source and the redirect of plain requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MappingTls>,
    /// How the proxies speak to a direct target (HTTP/2, a CA); default HTTP/1.1.
    #[serde(default, skip_serializing_if = "Upstream::is_default")]
    pub upstream: Upstream,
}

/// The most members a group target lists: the proxy tries them in turn for one request.
pub const MAX_GROUP_MEMBERS: usize = 64;

/// A load-balancing group of tunnel clients, resolved to its members when the record is written
/// (the writer rewrites the record when membership changes).
/// Unknown fields are ignored when read, so that a field added later does not make older
/// proxies refuse the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetGroup {
    /// The group's name as declared, e.g. `team-a/web` (namespaced) or `web` (single-node).
    pub name: String,
    /// Client ids of the members, sorted, without duplicates.
    pub clients: Vec<String>,
    #[serde(default)]
    pub balance: Balance,
}

impl TargetGroup {
    fn validate(&self) -> Result<(), String> {
        if self.clients.is_empty() {
            return Err("has no members".into());
        }
        if self.clients.len() > MAX_GROUP_MEMBERS {
            return Err(format!(
                "has {} members; at most {MAX_GROUP_MEMBERS}",
                self.clients.len()
            ));
        }
        for c in &self.clients {
            check_client_id(c).map_err(|e| format!("member {e}"))?;
        }
        if !self.clients.windows(2).all(|w| w[0] < w[1]) {
            return Err("members must be sorted and distinct".into());
        }
        Ok(())
    }
}

/// Why a spec cannot become a mapping. Names the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("subdomain {value:?}: {source}")]
    Subdomain {
        value: String,
        source: HostnameError,
    },
    #[error("target_host {value:?} is not a hostname or IP address")]
    TargetHost { value: String },
    #[error("target_port must be 1-65535, got 0")]
    TargetPort,
    #[error("target_client_id and target_group cannot both be set")]
    ClientAndGroup,
    #[error("target_group {name:?}: {problem}")]
    TargetGroup { name: String, problem: String },
    #[error("tls: {0}")]
    Tls(String),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("custom_headers: {name:?} is not a valid header name")]
    HeaderName { name: String },
    #[error("custom_headers: value of {name:?} contains a control character")]
    HeaderValue { name: String },
    #[error(
        "custom_headers: {name:?} cannot be set by a mapping (it frames the message, belongs to one connection, or is one of the proxies' own tunnox-* headers)"
    )]
    ReservedHeader { name: String },
}

/// Header names (lower case) a mapping's `custom_headers` cannot set: they frame the message or
/// belong to one connection, and setting them would desynchronise the proxy and the upstream.
pub const RESERVED_HEADERS: [&str; 10] = [
    "connection",
    "content-length",
    "expect",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

impl MappingSpec {
    /// A minimal spec, for tests and examples.
    pub fn new(subdomain: &str, base_domain: &str, host: &str, port: u16) -> Self {
        Self {
            subdomain: subdomain.to_string(),
            base_domain: Hostname::parse(base_domain).expect("valid base domain"),
            target_client_id: None,
            target_group: None,
            target_host: host.to_string(),
            target_port: port,
            target_scheme: Scheme::Http,
            owner_user_id: None,
            placement: None,
            source: None,
            expires_at: None,
            description: String::new(),
            custom_headers: BTreeMap::new(),
            enable_https: false,
            tls: None,
            upstream: Upstream::default(),
        }
    }

    /// Validates the spec and returns the normalised full domain it claims.
    pub fn validate(&self) -> Result<Hostname, SpecError> {
        let sub_err = |source| SpecError::Subdomain {
            value: self.subdomain.clone(),
            source,
        };
        let sub = Hostname::parse(&self.subdomain).map_err(sub_err)?;
        let full = Hostname::join(sub.as_str(), self.base_domain.as_str()).map_err(sub_err)?;
        let host_ok = self.target_host.parse::<std::net::IpAddr>().is_ok()
            || Hostname::parse(&self.target_host).is_ok_and(|h| h.as_str() == self.target_host);
        if !host_ok {
            return Err(SpecError::TargetHost {
                value: self.target_host.clone(),
            });
        }
        if self.target_port == 0 {
            return Err(SpecError::TargetPort);
        }
        if let Some(g) = &self.target_group {
            if self.target_client_id.is_some() {
                return Err(SpecError::ClientAndGroup);
            }
            g.validate().map_err(|problem| SpecError::TargetGroup {
                name: g.name.clone(),
                problem,
            })?;
        }
        if let Some(t) = &self.tls {
            t.validate().map_err(SpecError::Tls)?;
        }
        self.upstream
            .validate(self.target_scheme == Scheme::Https)
            .map_err(SpecError::Upstream)?;
        if !self.upstream.is_default()
            && (self.target_client_id.is_some() || self.target_group.is_some())
        {
            return Err(SpecError::Upstream(
                "protocol and CA settings apply to direct targets, not to tunnels".into(),
            ));
        }
        for (name, value) in &self.custom_headers {
            let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if name.is_empty() || !name.bytes().all(token) {
                return Err(SpecError::HeaderName { name: name.clone() });
            }
            if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                return Err(SpecError::HeaderValue { name: name.clone() });
            }
            let lower = name.to_ascii_lowercase();
            // `tunnox-*` headers carry the proxies' own signals (hops, the target, the transport).
            if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("tunnox-") {
                return Err(SpecError::ReservedHeader { name: name.clone() });
            }
        }
        Ok(full)
    }
}

/// A record's times, read with the RFC 3339 parser (what they are written in) before chrono's
/// general one: a warm-up reads two to four of them per record, a million records at a time
/// (issue: scale).
mod time {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer};

    fn parse(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .or_else(|_| s.parse())
    }

    pub fn read<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        crate::domain::deserialize_parsed(d, parse)
    }

    pub fn read_some<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        struct Time(DateTime<Utc>);
        impl<'de> Deserialize<'de> for Time {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                read(d).map(Time)
            }
        }
        Ok(Option::<Time>::deserialize(d)?.map(|t| t.0))
    }
}

/// A stored mapping: the spec plus identity, lifecycle, statistics and the store version at which
/// it was last written (the compare-and-set token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub mapping_id: MappingId,
    pub subdomain: String,
    pub base_domain: Hostname,
    pub full_domain: Hostname,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_client_id: Option<String>,
    /// Boxed: few mappings have a group, and inline it took a stored mapping past 512 bytes
    /// into the allocator's next size class (640 bytes each in the memory store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_group: Option<Box<TargetGroup>>,
    pub target_host: String,
    pub target_port: u16,
    #[serde(default)]
    pub target_scheme: Scheme,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_user_id: Option<String>,
    #[serde(default)]
    pub creator_node_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<SetName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default)]
    pub status: MappingStatus,
    #[serde(deserialize_with = "time::read")]
    pub created_at: DateTime<Utc>,
    #[serde(deserialize_with = "time::read")]
    pub updated_at: DateTime<Utc>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::read_some"
    )]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::read_some"
    )]
    pub last_access_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub enable_https: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MappingTls>,
    #[serde(default, skip_serializing_if = "Upstream::is_default")]
    pub upstream: Upstream,
    #[serde(default)]
    pub access_count: u64,
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
    /// Store version of the last write; assigned by the store, never by callers.
    #[serde(default)]
    pub version: u64,
}

impl Mapping {
    /// A new record for `spec`, which must already have been validated to `full_domain`.
    pub fn from_spec(
        id: MappingId,
        spec: MappingSpec,
        full_domain: Hostname,
        node: &str,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            mapping_id: id,
            subdomain: spec.subdomain,
            base_domain: spec.base_domain,
            full_domain,
            target_client_id: spec.target_client_id,
            target_group: spec.target_group.map(Box::new),
            target_host: spec.target_host,
            target_port: spec.target_port,
            target_scheme: spec.target_scheme,
            owner_user_id: spec.owner_user_id,
            creator_node_id: node.to_string(),
            placement: spec.placement,
            source: spec.source,
            status: MappingStatus::Active,
            created_at: now,
            updated_at: now,
            expires_at: spec.expires_at,
            last_access_at: None,
            description: spec.description,
            custom_headers: spec.custom_headers,
            enable_https: spec.enable_https,
            tls: spec.tls,
            upstream: spec.upstream,
            access_count: 0,
            bytes_in: 0,
            bytes_out: 0,
            version: 0,
        }
    }

    /// This record with `spec` applied: identity, creation, statistics are kept.
    pub fn with_spec(&self, spec: MappingSpec, full_domain: Hostname, now: DateTime<Utc>) -> Self {
        let mut next = Self::from_spec(
            self.mapping_id.clone(),
            spec,
            full_domain,
            &self.creator_node_id,
            self.created_at,
        );
        next.updated_at = now;
        next.status = self.status;
        next.last_access_at = self.last_access_at;
        next.access_count = self.access_count;
        next.bytes_in = self.bytes_in;
        next.bytes_out = self.bytes_out;
        next.version = self.version;
        next
    }

    /// The spec this record was written from.
    pub fn spec(&self) -> MappingSpec {
        MappingSpec {
            subdomain: self.subdomain.clone(),
            base_domain: self.base_domain.clone(),
            target_client_id: self.target_client_id.clone(),
            target_group: self.target_group.as_deref().cloned(),
            target_host: self.target_host.clone(),
            target_port: self.target_port,
            target_scheme: self.target_scheme,
            owner_user_id: self.owner_user_id.clone(),
            placement: self.placement.clone(),
            source: self.source.clone(),
            expires_at: self.expires_at,
            description: self.description.clone(),
            custom_headers: self.custom_headers.clone(),
            enable_https: self.enable_https,
            tls: self.tls.clone(),
            upstream: self.upstream.clone(),
        }
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory store keeps every record boxed: 512 bytes is an allocation size class, the
    /// next one is 640.
    #[test]
    fn a_mapping_stays_within_its_allocation_class() {
        assert!(
            std::mem::size_of::<Mapping>() <= 512,
            "{}",
            std::mem::size_of::<Mapping>()
        );
    }

    #[test]
    fn a_record_reads_back_as_written_and_times_in_other_spellings() {
        let spec = MappingSpec::new("a", "tunnox.net", "127.0.0.1", 80);
        let full = spec.validate().unwrap();
        let mut m = Mapping::from_spec(MappingId::generate(), spec, full, "n", Utc::now());
        assert_eq!(
            serde_json::from_str::<Mapping>(&serde_json::to_string(&m).unwrap()).unwrap(),
            m
        );
        m.expires_at = Some(Utc::now());
        m.last_access_at = Some(Utc::now());
        assert_eq!(
            serde_json::from_str::<Mapping>(&serde_json::to_string(&m).unwrap()).unwrap(),
            m
        );
        let mut json = serde_json::to_value(&m).unwrap();
        let cases = [
            ("2026-12-02T12:00:00+00:00", Some("2026-12-02T12:00:00Z")),
            (
                "2026-12-02T14:00:00.5+02:00",
                Some("2026-12-02T12:00:00.500Z"),
            ),
            ("2026-12-02 12:00:00Z", Some("2026-12-02T12:00:00Z")),
            ("yesterday", None),
            ("", None),
        ];
        for (written, want) in cases {
            json["created_at"] = written.into();
            let got = serde_json::from_value::<Mapping>(json.clone())
                .ok()
                .map(|m| m.created_at);
            let want = want.map(|w| w.parse::<DateTime<Utc>>().unwrap());
            assert_eq!(got, want, "{written}");
        }
        json["created_at"] = serde_json::to_value(m.created_at).unwrap();
        json["expires_at"] = serde_json::Value::Null;
        let read: Mapping = serde_json::from_value(json).unwrap();
        assert_eq!(read.expires_at, None);
    }

    #[test]
    fn validates_specs() {
        let ok = MappingSpec::new("MyApp", "tunnox.net", "127.0.0.1", 3000);
        assert_eq!(ok.validate().unwrap().as_str(), "myapp.tunnox.net");
        let nested = MappingSpec::new("a.b", "tunnox.net", "svc.ns.svc.cluster.local", 80);
        assert_eq!(nested.validate().unwrap().as_str(), "a.b.tunnox.net");

        let bad: Vec<(MappingSpec, &str)> = vec![
            (
                MappingSpec::new("my_app", "tunnox.net", "127.0.0.1", 1),
                "subdomain \"my_app\"",
            ),
            (
                MappingSpec::new("", "tunnox.net", "127.0.0.1", 1),
                "subdomain \"\"",
            ),
            (
                MappingSpec::new("a", "tunnox.net", "127.0.0.1", 0),
                "target_port",
            ),
            (
                MappingSpec::new("a", "tunnox.net", "bad host", 1),
                "target_host \"bad host\"",
            ),
            (
                MappingSpec::new("a", "tunnox.net", "UPPER.case", 1),
                "target_host",
            ),
            (
                MappingSpec {
                    custom_headers: [("X Bad".into(), "v".into())].into(),
                    ..MappingSpec::new("a", "tunnox.net", "::1", 1)
                },
                "custom_headers: \"X Bad\"",
            ),
            (
                MappingSpec {
                    custom_headers: [("Transfer-Encoding".into(), "chunked".into())].into(),
                    ..MappingSpec::new("a", "tunnox.net", "::1", 1)
                },
                "custom_headers: \"Transfer-Encoding\" cannot be set",
            ),
            (
                MappingSpec {
                    target_client_id: Some("a".into()),
                    target_group: Some(TargetGroup {
                        name: "ns/g".into(),
                        clients: vec!["a".into()],
                        balance: Balance::RoundRobin,
                    }),
                    ..MappingSpec::new("a", "tunnox.net", "::1", 1)
                },
                "target_client_id and target_group cannot both be set",
            ),
            (
                MappingSpec {
                    target_group: Some(TargetGroup {
                        name: "ns/g".into(),
                        clients: vec![],
                        balance: Balance::RoundRobin,
                    }),
                    ..MappingSpec::new("a", "tunnox.net", "::1", 1)
                },
                "target_group \"ns/g\": has no members",
            ),
            (
                MappingSpec {
                    target_group: Some(TargetGroup {
                        name: "ns/g".into(),
                        clients: vec!["b".into(), "a".into()],
                        balance: Balance::RoundRobin,
                    }),
                    ..MappingSpec::new("a", "tunnox.net", "::1", 1)
                },
                "members must be sorted and distinct",
            ),
            (
                MappingSpec {
                    target_group: Some(TargetGroup {
                        name: "ns/g".into(),
                        clients: vec!["a b".into()],
                        balance: Balance::RoundRobin,
                    }),
                    ..MappingSpec::new("a", "tunnox.net", "::1", 1)
                },
                "target_group \"ns/g\": member \"a b\"",
            ),
            (
                MappingSpec {
                    custom_headers: [("X-Ok".into(), "a\r\nb".into())].into(),
                    ..MappingSpec::new("a", "tunnox.net", "::1", 1)
                },
                "value of \"X-Ok\"",
            ),
        ];
        for (spec, want) in bad {
            let err = spec.validate().expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn json_field_names_are_stable() {
        let spec = MappingSpec::new("app", "tunnox.net", "127.0.0.1", 3000);
        let full = spec.validate().unwrap();
        let now = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let id = MappingId::parse("hdm_01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        let m = Mapping::from_spec(id, spec.clone(), full, "node-1", now);
        let json = serde_json::to_value(&m).unwrap();
        for field in [
            "mapping_id",
            "subdomain",
            "base_domain",
            "full_domain",
            "target_host",
            "target_port",
            "target_scheme",
            "creator_node_id",
            "status",
            "created_at",
            "updated_at",
            "enable_https",
            "access_count",
            "bytes_in",
            "bytes_out",
            "version",
        ] {
            assert!(json.get(field).is_some(), "missing {field} in {json}");
        }
        assert_eq!(json["full_domain"], "app.tunnox.net");
        assert_eq!(json["status"], "active");
        let back: Mapping = serde_json::from_value(json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.spec(), spec);
    }
}
