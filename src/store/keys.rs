//! Redis key names: the only place that spells them (the contract is `docs/redis-schema.md`).

use crate::domain::{Hostname, MappingId};

/// Key builder under two prefixes: the storage root (`storage.redis.key_prefix`, default
/// `tunnox`) for process-level keys such as the node registry, and the mapping prefix (default
/// `tunnox:http_domain`) for everything about mappings. In Redis Cluster, write the mapping
/// prefix with a hash tag (`{tunnox}:http_domain`) so each Lua script's keys share a slot.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
    prefix: String,
    events: String,
}

impl Keys {
    pub fn new(root: &str, prefix: &str, events_channel: Option<&str>) -> Self {
        Self {
            root: root.to_string(),
            prefix: prefix.to_string(),
            events: events_channel
                .map(str::to_string)
                .unwrap_or_else(|| format!("{prefix}:events")),
        }
    }

    pub fn root(&self) -> &str {
        &self.root
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

    /// Mapping ids whose `source` is in `group` (see `source_group`): what a per-namespace
    /// quota counts.
    pub fn group(&self, group: &str) -> String {
        format!("{}:index:group:{group}", self.prefix)
    }

    /// Sorted set of every mapping id (score 0, lexical order = creation order).
    pub fn all(&self) -> String {
        format!("{}:index:all", self.prefix)
    }

    /// Sorted set of mapping ids scored by `expires_at` in Unix milliseconds.
    pub fn expiry(&self) -> String {
        format!("{}:index:expiry", self.prefix)
    }

    /// Hash of a mapping's access counters, apart from the record so that counting traffic
    /// neither bumps the version nor rewrites the JSON.
    pub fn stats(&self, id: &MappingId) -> String {
        format!("{}:stats:{id}", self.prefix)
    }

    /// Hash of a tunnel client's live sessions, one field per agent session (`instance/slot`).
    pub fn client_sessions(&self, client_id: &str) -> String {
        format!("{}:client:{client_id}:session", self.root)
    }

    /// A tunnel client's credential (token hash, placement).
    /// An ACME HTTP-01 answer, with a TTL.
    pub fn acme_challenge(&self, token: &str) -> String {
        format!("{}:acme:challenge:{token}", self.root)
    }

    pub fn client_auth(&self, client_id: &str) -> String {
        format!("{}:tunnel:client:{client_id}:auth", self.root)
    }

    /// Pub/sub channel of client ids whose tunnel sessions changed.
    pub fn session_events(&self) -> String {
        format!("{}:sessions:events", self.root)
    }

    /// Hash of the claimed remote ports of `set`'s business (one port space per business):
    /// port → JSON claim.
    pub fn ports(&self, set: &crate::domain::SetName) -> String {
        format!("{}:ports:{}", self.root, set.business())
    }

    /// Counter moved by every change of [`Keys::ports`].
    pub fn ports_version(&self, set: &crate::domain::SetName) -> String {
        format!("{}:ports:{}:version", self.root, set.business())
    }

    /// Hash of what each remote port of a business carried: `port:connections`,
    /// `port:bytes_in`, `port:bytes_out`.
    pub fn port_traffic(&self, set: &crate::domain::SetName) -> String {
        format!("{}:ports:{}:traffic", self.root, set.business())
    }

    /// Hash of remote ports proxies of a business could not listen on: `port/node` → why.
    pub fn port_errors(&self, set: &crate::domain::SetName) -> String {
        format!("{}:ports:{}:errors", self.root, set.business())
    }

    /// Hash of one proxy node's registration; expires unless the node heartbeats.
    pub fn node(&self, node_id: &str) -> String {
        format!("{}:node:{node_id}", self.root)
    }

    /// Pub/sub channel of applied versions announced by nodes (JSON [`crate::store::Applied`]).
    pub fn applied_events(&self) -> String {
        format!("{}:nodes:applied", self.root)
    }

    /// Set of registered node ids: the index that lets listing avoid `KEYS`.
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.root)
    }

    pub fn version(&self) -> String {
        format!("{}:version", self.prefix)
    }

    /// The store epoch: a random id created when absent, so a flushed or emptied Redis is
    /// told from a continuous one (docs/redis-schema.md "Epoch").
    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    /// Hash: the controller's "rebuilt at epoch E" marker.
    pub fn rebuilt(&self) -> String {
        format!("{}:rebuilt", self.prefix)
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
        let k = Keys::new("tunnox", "tunnox:http_domain", None);
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
        assert_eq!(
            k.group("k8s:c1/team-a"),
            "tunnox:http_domain:index:group:k8s:c1/team-a"
        );
        assert_eq!(k.expiry(), "tunnox:http_domain:index:expiry");
        assert_eq!(k.version(), "tunnox:http_domain:version");
        assert_eq!(k.changes(), "tunnox:http_domain:changes");
        assert_eq!(k.epoch(), "tunnox:http_domain:epoch");
        assert_eq!(k.rebuilt(), "tunnox:http_domain:rebuilt");
        assert_eq!(k.events(), "tunnox:http_domain:events");
        assert_eq!(
            k.stats(&id),
            "tunnox:http_domain:stats:hdm_01ARZ3NDEKTSV4RRFFQ69G5FAV"
        );
        assert_eq!(k.node("proxy-1"), "tunnox:node:proxy-1");
        assert_eq!(k.nodes(), "tunnox:nodes");
        assert_eq!(k.applied_events(), "tunnox:nodes:applied");
        assert_eq!(Keys::new("r", "p", Some("chan")).events(), "chan");
        // The root is independent of the mapping prefix, even when the latter is overridden.
        let custom = Keys::new("{t}", "other:maps", None);
        assert_eq!(custom.node("n"), "{t}:node:n");
        assert_eq!(
            custom.stats(&id),
            "other:maps:stats:hdm_01ARZ3NDEKTSV4RRFFQ69G5FAV"
        );
    }
}
