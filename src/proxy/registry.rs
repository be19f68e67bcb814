//! This node in the registry (`<root>:node:{id}`): a heartbeat with its set, addresses, state
//! and applied version; and the sets that currently have a healthy node, for placement.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;

use super::drain::Drain;
use super::sync::SyncState;
use crate::domain::SetName;
use crate::store::{NodeRecord, NodeRegistry, NodeState, healthy_sets};

/// The fleet as the last heartbeat read it: the sets with at least one active node, and those
/// nodes (where requests for another set are forwarded).
/// The healthy sets and their active nodes.
type Seen = (Arc<[SetName]>, Arc<[NodeRecord]>);

#[derive(Default)]
pub struct HealthySets {
    seen: RwLock<Seen>,
    /// Where the next forward starts in a set's nodes (round robin).
    next: AtomicUsize,
}

impl HealthySets {
    pub fn get(&self) -> Arc<[SetName]> {
        self.seen.read().expect("not poisoned").0.clone()
    }

    /// The active nodes of `set`, ordered by id.
    pub fn nodes_of(&self, set: &SetName) -> Vec<NodeRecord> {
        let nodes = self.seen.read().expect("not poisoned").1.clone();
        nodes.iter().filter(|n| &n.set == set).cloned().collect()
    }

    /// The active nodes of `set` but `me`, in the order to try them: each call starts one
    /// further along (round robin), the rest follow as fallbacks.
    pub fn rotation(&self, set: &SetName, me: &str) -> Vec<NodeRecord> {
        let mut nodes = self.nodes_of(set);
        nodes.retain(|n| n.node_id != me);
        if !nodes.is_empty() {
            let first = self.next.fetch_add(1, Ordering::Relaxed) % nodes.len();
            nodes.rotate_left(first);
        }
        nodes
    }

    fn set(&self, nodes: &[NodeRecord]) {
        let mut active: Vec<NodeRecord> = nodes
            .iter()
            .filter(|n| n.state == NodeState::Active)
            .cloned()
            .collect();
        active.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        *self.seen.write().expect("not poisoned") = (healthy_sets(nodes).into(), active.into());
    }
}

pub struct Heartbeat {
    pub nodes: Arc<dyn NodeRegistry>,
    pub node_id: String,
    pub set: SetName,
    pub address: String,
    pub admin_address: String,
    /// Where agents dial this node (empty: no tunnel listener).
    pub tunnel_address: String,
    pub every: Duration,
    pub ttl: Duration,
    pub drain: Arc<Drain>,
    pub sync: Arc<SyncState>,
    pub healthy: Arc<HealthySets>,
}

impl Heartbeat {
    fn record(&self) -> NodeRecord {
        let (epoch, applied) = self.sync.applied_at();
        NodeRecord {
            node_id: self.node_id.clone(),
            set: self.set.clone(),
            address: self.address.clone(),
            admin_address: self.admin_address.clone(),
            tunnel_address: self.tunnel_address.clone(),
            state: if self.drain.is_draining() {
                NodeState::Draining
            } else {
                NodeState::Active
            },
            applied_version: applied,
            epoch,
            heartbeat_at: Utc::now(),
        }
    }

    async fn beat(&self) {
        if let Err(e) = self.nodes.register_node(&self.record(), self.ttl).await {
            tracing::warn!(error = %e, "cannot refresh this node in the registry");
            return;
        }
        match self.nodes.list_nodes().await {
            Ok(nodes) => self.healthy.set(&nodes),
            Err(e) => tracing::warn!(error = %e, "cannot read the node registry"),
        }
    }

    /// Announces the version just applied, so `Ready` does not wait for the next heartbeat.
    async fn announce(&self) {
        let (epoch, applied) = self.sync.applied_at();
        let applied = crate::store::Applied {
            node_id: self.node_id.clone(),
            set: self.set.clone(),
            epoch,
            applied,
        };
        self.nodes.announce_applied(&applied).await;
    }

    /// Beats every `every` (and at once when draining starts) until `stop`; then leaves.
    /// Announces each newly applied version in between.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The epoch the registry holds for this node: when the table's changes (warm-up done,
        // another history) the record is written again at once, so the controller counts this
        // node as warm without waiting for the next heartbeat.
        let mut registered = String::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    registered = self.sync.applied_at().0;
                    self.beat().await;
                }
                _ = self.drain.changed.notified() => self.beat().await,
                _ = self.sync.advanced.notified() => {
                    let epoch = self.sync.applied_at().0;
                    if epoch != registered {
                        registered = epoch;
                        self.beat().await;
                    }
                    self.announce().await;
                }
                _ = super::stopped(&mut stop) => break,
            }
        }
        if let Err(e) = self.nodes.remove_node(&self.node_id).await {
            tracing::warn!(error = %e, "cannot remove this node from the registry; it expires");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_active_nodes_make_a_set_healthy() {
        let node = |id: &str, set: &str, state| NodeRecord {
            node_id: id.into(),
            set: SetName::parse(set).unwrap(),
            address: "127.0.0.1:1".into(),
            admin_address: "127.0.0.1:2".into(),
            tunnel_address: String::new(),
            state,
            applied_version: 0,
            epoch: String::new(),
            heartbeat_at: Utc::now(),
        };
        let nodes = [
            node("a", "novel.sh", NodeState::Active),
            node("b", "novel.sh", NodeState::Draining),
            node("c", "novel.sz", NodeState::Draining),
            node("d", "game.sh", NodeState::Active),
            node("e", "game.sh", NodeState::Active),
        ];
        let got: Vec<String> = healthy_sets(&nodes).iter().map(|s| s.to_string()).collect();
        assert_eq!(got, vec!["game.sh", "novel.sh"]);
        let fleet = HealthySets::default();
        fleet.set(&nodes);
        let ids = |set: &str| -> Vec<String> {
            let set = SetName::parse(set).unwrap();
            fleet
                .nodes_of(&set)
                .into_iter()
                .map(|n| n.node_id)
                .collect()
        };
        assert_eq!(ids("game.sh"), ["d", "e"]);
        assert_eq!(ids("novel.sh"), ["a"]);
        assert!(ids("novel.sz").is_empty());
        // Round robin over a set's other nodes, each call starting one further.
        let game = SetName::parse("game.sh").unwrap();
        let firsts: Vec<String> = (0..4)
            .map(|_| fleet.rotation(&game, "x")[0].node_id.clone())
            .collect();
        assert_eq!(firsts, ["d", "e", "d", "e"]);
        assert_eq!(
            fleet.rotation(&game, "d").len(),
            1,
            "never this node itself"
        );
    }
}
