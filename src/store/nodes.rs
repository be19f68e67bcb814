//! The node registry: proxy nodes announce themselves with a heartbeat that expires, so the
//! control plane sees which nodes are alive, what they serve and how far their caches are.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::domain::SetName;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Active,
    Draining,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "active" => Some(Self::Active),
            "draining" => Some(Self::Draining),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: String,
    pub set: SetName,
    /// host:port the proxy serves HTTP on
    pub address: String,
    /// host:port of its admin server
    pub admin_address: String,
    /// host:port agents dial for a tunnel session (`proxy.tunnel`); empty when it has no
    /// tunnel listener.
    #[serde(default)]
    pub tunnel_address: String,
    pub state: NodeState,
    /// last store version this node applied to its cache
    pub applied_version: u64,
    /// The store epoch that version belongs to (empty: not known yet, or a node from before
    /// epochs were announced).
    #[serde(default)]
    pub epoch: String,
    pub heartbeat_at: DateTime<Utc>,
}

/// The sets with at least one active (not draining) node, sorted.
pub fn healthy_sets(nodes: &[NodeRecord]) -> Vec<SetName> {
    let mut sets: Vec<SetName> = nodes
        .iter()
        .filter(|n| n.state == NodeState::Active)
        .map(|n| n.set.clone())
        .collect();
    sets.sort();
    sets.dedup();
    sets
}

/// Where proxy nodes register. A registration lives for its time-to-live, so a node that dies
/// without removing itself disappears by itself.
#[async_trait]
pub trait NodeRegistry: Send + Sync + 'static {
    /// Upserts the record and (re)sets its time-to-live.
    async fn register_node(&self, node: &NodeRecord, ttl: Duration) -> Result<(), StoreError>;
    async fn remove_node(&self, node_id: &str) -> Result<(), StoreError>;
    /// Live nodes (expired ones are not returned), sorted by node_id.
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;

    /// Tells whoever follows [`NodeRegistry::applied_events`] that a node applied a new
    /// version, at once rather than with its next heartbeat. Best effort: a lost announcement
    /// is caught up from the registry.
    async fn announce_applied(&self, _applied: &Applied) {}

    /// Announced versions, from every node, for as long as the receiver lives (subscribing
    /// again after a lost connection); `None` where the store has no such feed (single-node).
    fn applied_events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Applied>> {
        None
    }
}

/// A node's announcement that it applied `applied` of the store's history `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub node_id: String,
    pub set: SetName,
    pub epoch: String,
    pub applied: u64,
}

impl Applied {
    /// The longest announcement read: node ids, set names and epochs are short, so anything
    /// longer was not written by a node.
    pub const MAX_LEN: usize = 512;

    /// An announcement from its wire form (JSON); `None` when it is not one (too long,
    /// malformed, a set name that does not parse).
    pub fn parse(raw: &[u8]) -> Option<Self> {
        if raw.len() > Self::MAX_LEN {
            return None;
        }
        serde_json::from_slice(raw).ok()
    }
}

/// The memory store's registry: records with their expiry instants, never persisted (a
/// registration is only meaningful while its process runs).
#[derive(Debug, Default)]
pub(crate) struct NodeTable {
    nodes: BTreeMap<String, (NodeRecord, Instant)>,
}

impl NodeTable {
    pub fn register(&mut self, node: &NodeRecord, expires_at: Instant) {
        self.nodes
            .insert(node.node_id.clone(), (node.clone(), expires_at));
    }

    pub fn remove(&mut self, node_id: &str) {
        self.nodes.remove(node_id);
    }

    /// Drops the registrations expired at `now` and returns the rest in node_id order.
    pub fn live(&mut self, now: Instant) -> Vec<NodeRecord> {
        self.nodes.retain(|_, (_, expires_at)| *expires_at > now);
        self.nodes.values().map(|(n, _)| n.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> NodeRecord {
        NodeRecord {
            node_id: id.into(),
            set: SetName::parse("web.eu-west").unwrap(),
            address: "10.0.0.1:8080".into(),
            admin_address: "10.0.0.1:9090".into(),
            tunnel_address: String::new(),
            state: NodeState::Active,
            applied_version: 0,
            epoch: String::new(),
            heartbeat_at: DateTime::from_timestamp_millis(0).unwrap(),
        }
    }

    #[test]
    fn state_names_match_serde() {
        for state in [NodeState::Active, NodeState::Draining] {
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{}\"", state.as_str())
            );
            assert_eq!(NodeState::parse(state.as_str()), Some(state));
        }
        assert_eq!(NodeState::parse("Active"), None);
    }

    #[test]
    fn table_expires_replaces_and_sorts() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        /// (registrations as (id, ms to expiry), removals, ms at which to read, live ids)
        type Case = (
            Vec<(&'static str, u64)>,
            Vec<&'static str>,
            u64,
            Vec<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (vec![("b", 100), ("a", 100)], vec![], 50, vec!["a", "b"]),
            (vec![("a", 100), ("b", 10)], vec![], 50, vec!["a"]),
            (vec![("a", 100)], vec![], 100, vec![]), // expiry is exclusive
            (vec![("a", 10), ("a", 100)], vec![], 50, vec!["a"]), // re-registration extends
            (vec![("a", 100), ("b", 100)], vec!["a", "zz"], 0, vec!["b"]),
        ];
        for (regs, removals, read_at, want) in cases {
            let mut t = NodeTable::default();
            for (id, ttl) in &regs {
                t.register(&node(id), t0 + ms(*ttl));
            }
            for id in &removals {
                t.remove(id);
            }
            let got: Vec<String> = t
                .live(t0 + ms(read_at))
                .into_iter()
                .map(|n| n.node_id)
                .collect();
            assert_eq!(got, want, "{regs:?} minus {removals:?} at {read_at} ms");
        }
    }

    #[test]
    fn re_registration_replaces_the_record() {
        let t0 = Instant::now();
        let mut t = NodeTable::default();
        t.register(&node("a"), t0 + Duration::from_secs(1));
        let mut draining = node("a");
        draining.state = NodeState::Draining;
        draining.applied_version = 7;
        t.register(&draining, t0 + Duration::from_secs(1));
        assert_eq!(t.live(t0), vec![draining]);
    }
}
