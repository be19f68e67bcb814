//! The node registry on Redis: one hash per node (`<root>:node:<id>`) that expires unless the
//! node heartbeats, and the set `<root>:nodes` as the index to list them without `KEYS`.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use redis::{AsyncCommands, Value};

use super::RedisStore;
use crate::domain::SetName;
use crate::store::{Applied, NodeRecord, NodeRegistry, NodeState, StoreError};

/// The hash fields of a registration (the contract in `docs/redis-schema.md`).
fn encode(node: &NodeRecord) -> Vec<(&'static str, String)> {
    vec![
        ("node_id", node.node_id.clone()),
        ("set", node.set.to_string()),
        ("address", node.address.clone()),
        ("admin_address", node.admin_address.clone()),
        ("tunnel_address", node.tunnel_address.clone()),
        ("state", node.state.as_str().to_string()),
        ("applied_version", node.applied_version.to_string()),
        ("epoch", node.epoch.clone()),
        // Full precision, so a record reads back exactly as it was written.
        (
            "heartbeat_at",
            node.heartbeat_at
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        ),
    ]
}

/// A registration from its hash fields, or why it cannot be read.
fn decode(fields: &HashMap<String, String>) -> Result<NodeRecord, String> {
    let field = |name: &str| {
        fields
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| format!("missing field {name}"))
    };
    let state = field("state")?;
    let applied = field("applied_version")?;
    let heartbeat = field("heartbeat_at")?;
    Ok(NodeRecord {
        node_id: field("node_id")?.to_string(),
        set: SetName::parse(field("set")?).map_err(|e| e.to_string())?,
        address: field("address")?.to_string(),
        admin_address: field("admin_address")?.to_string(),
        // Written by nodes since tunnels; an older node's record has none.
        tunnel_address: fields.get("tunnel_address").cloned().unwrap_or_default(),
        state: NodeState::parse(state).ok_or_else(|| format!("unknown state {state:?}"))?,
        applied_version: applied
            .parse()
            .map_err(|_| format!("applied_version {applied:?} is not a version"))?,
        // Written by nodes since `Ready` means served; an older node's record has none.
        epoch: fields.get("epoch").cloned().unwrap_or_default(),
        heartbeat_at: DateTime::parse_from_rfc3339(heartbeat)
            .map_err(|e| format!("heartbeat_at {heartbeat:?}: {e}"))?
            .with_timezone(&Utc),
    })
}

/// One `HGETALL` reply: `Ok(None)` when the hash is gone (expired), `Err` when unreadable.
fn read_reply(id: &str, reply: Value) -> Result<Option<NodeRecord>, String> {
    let fields: HashMap<String, String> = match reply {
        Value::ServerError(e) => return Err(e.to_string()),
        v => redis::from_redis_value(v).map_err(|e| e.to_string())?,
    };
    if fields.is_empty() {
        return Ok(None);
    }
    let node = decode(&fields)?;
    if node.node_id != id {
        return Err(format!("holds node_id {:?}", node.node_id));
    }
    Ok(Some(node))
}

#[async_trait]
impl NodeRegistry for RedisStore {
    async fn register_node(&self, node: &NodeRecord, ttl: Duration) -> Result<(), StoreError> {
        let k = &self.inner.keys;
        let key = k.node(&node.node_id);
        // PEXPIRE 0 would delete the hash at once: the shortest TTL is one millisecond.
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        // One transaction: readers never see a registration without its TTL or index entry.
        // The DEL drops fields (or a wrong-typed value) no longer written.
        let () = redis::pipe()
            .atomic()
            .del(&key)
            .ignore()
            .cmd("HSET")
            .arg(&key)
            .arg(encode(node))
            .ignore()
            .pexpire(&key, ttl_ms)
            .ignore()
            .sadd(k.nodes(), &node.node_id)
            .ignore()
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn remove_node(&self, node_id: &str) -> Result<(), StoreError> {
        let k = &self.inner.keys;
        let () = redis::pipe()
            .atomic()
            .del(k.node(node_id))
            .ignore()
            .srem(k.nodes(), node_id)
            .ignore()
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let k = &self.inner.keys;
        let mut conn = self.conn();
        let mut ids: Vec<String> = conn.smembers(k.nodes()).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        ids.sort();
        let mut pipe = redis::pipe();
        // One unreadable hash (say, of the wrong type) must not hide every other node.
        pipe.ignore_errors();
        for id in &ids {
            pipe.hgetall(k.node(id));
        }
        let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
        let mut nodes = Vec::with_capacity(ids.len());
        let mut expired = Vec::new();
        for (id, reply) in ids.iter().zip(replies) {
            match read_reply(id, reply) {
                Ok(Some(node)) => nodes.push(node),
                Ok(None) => expired.push(id.as_str()),
                Err(detail) => tracing::warn!(
                    key = %k.node(id),
                    %detail,
                    "skipping unreadable node registration"
                ),
            }
        }
        if !expired.is_empty() {
            let mut prune = self.inner.scripts.prune_nodes.prepare_invoke();
            prune.key(k.nodes());
            for id in &expired {
                prune.key(k.node(id)).arg(*id);
            }
            let _: i64 = prune.invoke_async(&mut conn).await?;
        }
        Ok(nodes)
    }

    async fn announce_applied(&self, applied: &Applied) {
        let Ok(json) = serde_json::to_string(applied) else {
            return;
        };
        let published: Result<i64, _> = self
            .conn()
            .publish(self.inner.keys.applied_events(), json)
            .await;
        if let Err(e) = published {
            tracing::debug!(error = %e, "cannot announce the applied version");
        }
    }

    fn applied_events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Applied>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(self.clone().follow_channel(
            self.inner.keys.applied_events(),
            Applied::parse,
            tx,
        ));
        Some(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeRecord {
        NodeRecord {
            node_id: "proxy-1".into(),
            set: SetName::parse("web.eu-west").unwrap(),
            address: "10.0.0.1:8080".into(),
            admin_address: "10.0.0.1:9090".into(),
            tunnel_address: "10.0.0.1:7000".into(),
            state: NodeState::Draining,
            applied_version: 42,
            epoch: String::new(),
            heartbeat_at: DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456789Z")
                .unwrap()
                .with_timezone(&Utc),
        }
    }

    fn fields(node: &NodeRecord) -> HashMap<String, String> {
        encode(node)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    #[test]
    fn encode_decode_round_trip_is_exact() {
        let n = node();
        let f = fields(&n);
        assert_eq!(f["heartbeat_at"], "2026-01-02T03:04:05.123456789Z");
        assert_eq!(f["state"], "draining");
        assert_eq!(f["set"], "web.eu-west");
        assert_eq!(decode(&f), Ok(n.clone()));
        // A node from before tunnels wrote no tunnel address: it has no tunnel listener.
        let mut old = f.clone();
        old.remove("tunnel_address");
        let got = decode(&old).unwrap();
        assert_eq!(got.tunnel_address, "");
        assert_eq!(got.admin_address, n.admin_address);
    }

    #[test]
    fn malformed_hashes_are_errors_not_panics() {
        let cases: Vec<(&str, Option<&str>, &str)> = vec![
            ("state", Some("sleeping"), "unknown state"),
            ("state", None, "missing field state"),
            ("set", Some("no-dot"), "invalid set name"),
            ("applied_version", Some("-1"), "not a version"),
            ("heartbeat_at", Some("yesterday"), "heartbeat_at"),
            ("address", None, "missing field address"),
        ];
        for (name, value, want) in cases {
            let mut f = fields(&node());
            match value {
                Some(v) => f.insert(name.to_string(), v.to_string()),
                None => f.remove(name),
            };
            let err = decode(&f).unwrap_err();
            assert!(err.contains(want), "{name}={value:?}: {err}");
        }
    }

    #[test]
    fn replies_distinguish_expired_unreadable_and_live() {
        let n = node();
        let hash = Value::Array(
            encode(&n)
                .into_iter()
                .flat_map(|(k, v)| {
                    [
                        Value::BulkString(k.as_bytes().to_vec()),
                        Value::BulkString(v.into_bytes()),
                    ]
                })
                .collect(),
        );
        assert_eq!(read_reply("proxy-1", hash.clone()), Ok(Some(n)));
        assert_eq!(read_reply("proxy-1", Value::Array(vec![])), Ok(None));
        assert!(read_reply("proxy-2", hash).unwrap_err().contains("proxy-1"));
        assert!(read_reply("proxy-1", Value::Int(3)).is_err());
    }
}
