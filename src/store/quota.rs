//! Quotas the store enforces in the same atomic step as the domain claim: how many records one
//! source group (a Kubernetes namespace of one cluster) and one owner may hold.
//!
//! Counting in the store rather than in a controller's cache is what makes a quota hold under
//! concurrent creators (several reconcile workers, several controllers): the count and the claim
//! are one Lua script on Redis and one lock on the memory store.

use std::fmt;

/// Limits for one create; 0 is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    /// Records whose source is in the same group ([`source_group`]).
    pub per_group: usize,
    /// Records with the same `owner_user_id`.
    pub per_owner: usize,
}

impl Quota {
    pub const UNLIMITED: Self = Self {
        per_group: 0,
        per_owner: 0,
    };
}

/// Which quota refused a create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaScope {
    /// A source group, e.g. `k8s:prod-eu/team-a` (one namespace of one cluster).
    Group(String),
    /// An owner's user id.
    Owner(String),
}

impl QuotaScope {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Group(_) => "group",
            Self::Owner(_) => "owner",
        }
    }
}

impl fmt::Display for QuotaScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Group(g) => write!(f, "source group {g}"),
            Self::Owner(o) => write!(f, "owner {o}"),
        }
    }
}

/// The group a record's `source` counts under: everything before its last `/`
/// (`k8s:prod-eu/team-a/web` → `k8s:prod-eu/team-a`). Sources without a `/` (`config`, `api`)
/// belong to no group and no group quota applies to them.
pub fn source_group(source: &str) -> Option<&str> {
    source
        .rsplit_once('/')
        .map(|(group, _)| group)
        .filter(|g| !g.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_sources() {
        let cases = [
            ("k8s:prod-eu/team-a/web", Some("k8s:prod-eu/team-a")),
            ("k8s:team-a/web", Some("k8s:team-a")),
            ("config", None),
            ("api", None),
            ("/web", None),
            ("", None),
        ];
        for (source, want) in cases {
            assert_eq!(source_group(source), want, "{source:?}");
        }
    }
}
