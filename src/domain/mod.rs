//! Pure domain types shared by every role: hostnames, mapping records, ids and set names.

pub mod balance;
pub mod egress;
pub mod health;
mod hostname;
mod ids;
mod mapping;
mod set;
pub mod tls;
pub mod upstream;

pub use balance::Balance;
pub use egress::{Declarer, EgressPolicy, Refusal};
pub use health::{CheckKind, HealthCheck};
pub use hostname::{Hostname, HostnameError, MAX_HOSTNAME_LEN, MAX_LABEL_LEN};
pub use ids::{MappingId, MappingIdError, check_client_id};
pub use mapping::{
    MAX_GROUP_MEMBERS, Mapping, MappingSpec, MappingStatus, RESERVED_HEADERS, Scheme, SpecError,
    TargetGroup,
};
pub use set::{DR_REGION, Decision, SetName, SetNameError, decide, serving_set};
pub use tls::{CertSource, MappingTls};
pub use upstream::{Protocol, Upstream};

/// Deserializes a string with `parse`, reading it in place (no copy of the text first): a
/// proxy's warm-up decodes ids and hostnames of a million records (issue: scale).
pub(crate) fn deserialize_parsed<'de, D, T, E>(
    d: D,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    E: std::fmt::Display,
{
    struct Parsed<F>(F);
    impl<'de, T, E: std::fmt::Display, F: FnOnce(&str) -> Result<T, E>> serde::de::Visitor<'de>
        for Parsed<F>
    {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<X: serde::de::Error>(self, v: &str) -> Result<T, X> {
            (self.0)(v).map_err(X::custom)
        }
        fn visit_bytes<X: serde::de::Error>(self, v: &[u8]) -> Result<T, X> {
            let v = std::str::from_utf8(v).map_err(|_| X::custom("not UTF-8"))?;
            self.visit_str(v)
        }
    }
    d.deserialize_str(Parsed(parse))
}
