//! Types shared by both custom resources.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// RFC 1123 DNS label, lower case.
pub const LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";
/// One or more RFC 1123 labels separated by dots, lower case.
pub const HOSTNAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$";

/// Which proxy set serves this resource: `<business>.<region>`. When no node of that set is
/// healthy, the business's disaster-recovery set (`<business>.*`) serves it; never another
/// business or region.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Business the proxy set belongs to, e.g. `novel`.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"),
        length(max = 63)
    )]
    pub business: String,
    /// Region of the set, e.g. `sh`. Use `*` to pin to the business's disaster-recovery set.
    #[schemars(
        regex(pattern = r"^(\*|[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)$"),
        length(max = 63)
    )]
    pub region: String,
}

/// Lifecycle phase shown in `kubectl get`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Phase {
    /// Not programmed yet (or waiting for a dependency such as the client's TunnelSet).
    #[default]
    Pending,
    /// Programmed into Redis and served.
    Active,
    /// The domain (or port) is held by another resource: see `claimedBy`.
    Conflict,
    /// Invalid or not allowed: see the `Accepted` condition's message.
    Rejected,
    /// `expiresAt` has passed; the domain was released.
    Expired,
}

/// A reference to a key in a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"))]
    pub name: String,
    /// Key within the Secret; default `token`.
    #[serde(default = "default_token_key")]
    pub key: String,
}

fn default_token_key() -> String {
    "token".to_string()
}
