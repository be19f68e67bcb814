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
