//! Redis key names: the only place that spells them (the contract is `docs/redis-schema.md`).

use crate::domain::{Hostname, MappingId};

/// Key builder under one prefix (default `tunnox:http_domain`). In Redis Cluster, write the
/// prefix with a hash tag (`{tunnox}:http_domain`) so each Lua script's keys share a slot.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    events: String,
}

impl Keys {
    pub fn new(prefix: &str, events_channel: Option<&str>) -> Self {
        Self {
            prefix: prefix.to_string(),
            events: events_channel
                .map(str::to_string)
                .unwrap_or_else(|| format!("{prefix}:events")),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn mapping(&self, id: &MappingId) -> String {
        format!("{}:mapping:{id}", self.prefix)
    }

    /// The claim: holds the mapping id owning the domain. Created with NX semantics.
    pub fn domain(&self, domain: &Hostname) -> String {
        format!("{}:index:domain:{domain}", self.prefix)
    }

    pub fn client(&self, client_id: &str) -> String {
        format!("{}:index:client:{client_id}", self.prefix)
    }

    pub fn user(&self, user_id: &str) -> String {
        format!("{}:index:user:{user_id}", self.prefix)
    }

    /// Sorted set of every mapping id (score 0, lexical order = creation order).
    pub fn all(&self) -> String {
        format!("{}:index:all", self.prefix)
    }

    /// Sorted set of mapping ids scored by `expires_at` in Unix milliseconds.
    pub fn expiry(&self) -> String {
        format!("{}:index:expiry", self.prefix)
    }

    pub fn version(&self) -> String {
        format!("{}:version", self.prefix)
    }

    pub fn changes(&self) -> String {
        format!("{}:changes", self.prefix)
    }

    pub fn events(&self) -> &str {
        &self.events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout_matches_the_contract() {
        let k = Keys::new("tunnox:http_domain", None);
        let id = MappingId::parse("hdm_01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        let d = Hostname::parse("app.tunnox.net").unwrap();
        assert_eq!(
            k.mapping(&id),
            "tunnox:http_domain:mapping:hdm_01ARZ3NDEKTSV4RRFFQ69G5FAV"
        );
        assert_eq!(
            k.domain(&d),
            "tunnox:http_domain:index:domain:app.tunnox.net"
        );
        assert_eq!(k.client("c1"), "tunnox:http_domain:index:client:c1");
        assert_eq!(k.user("u1"), "tunnox:http_domain:index:user:u1");
        assert_eq!(k.all(), "tunnox:http_domain:index:all");
        assert_eq!(k.expiry(), "tunnox:http_domain:index:expiry");
        assert_eq!(k.version(), "tunnox:http_domain:version");
        assert_eq!(k.changes(), "tunnox:http_domain:changes");
        assert_eq!(k.events(), "tunnox:http_domain:events");
        assert_eq!(Keys::new("p", Some("chan")).events(), "chan");
    }
}
