//! Which member of a load-balancing group carries an HTTP request: the members in the group's
//! order (round robin, or least requests in flight through this proxy), the first that has a
//! session on this node or, by the store, on another. A member goes out of the rotation as soon
//! as its last session is gone (at most the heartbeat window after its agent stops answering)
//! and comes back with its next session. The request is then sent as to a single client.

use super::Tunnels;
use super::spread::Carrying;
use crate::proxy::ProxyError;
use crate::proxy::route::GroupRoute;

/// The member chosen for one request, counted as in flight until dropped.
pub struct Member {
    pub client_id: String,
    pub carrying: Carrying<String>,
}

impl Tunnels {
    /// Chooses the member of `group` a request goes to. `named`: the member another node chose
    /// (the `tunnox-client` header of a request a peer forwarded here, `from_peer`); such a
    /// request is served from this node's sessions only.
    pub async fn member(
        &self,
        group: &GroupRoute,
        named: Option<&str>,
        from_peer: bool,
    ) -> Result<Member, ProxyError> {
        let order = self
            .group_load
            .order_of(group.balance, &group.turn, &group.clients);
        let chosen = if from_peer {
            // A peer's choice stands when it is a member; an older node that named none gets
            // the first member held here.
            match named {
                Some(c) => group.clients.iter().find(|m| *m == c),
                None => order
                    .iter()
                    .map(|&i| &group.clients[i])
                    .find(|c| !self.local.of(c).is_empty()),
            }
            .ok_or_else(|| ProxyError::NotHeldHere(named.unwrap_or(&group.name).to_string()))?
        } else {
            let mut found = None;
            for &i in &order {
                let c = &group.clients[i];
                if self.is_online(c).await {
                    found = Some(c);
                    break;
                }
                self.metrics
                    .group_members
                    .with_label_values(&["offline_skipped"])
                    .inc();
            }
            found.ok_or_else(|| ProxyError::TunnelGroupOffline(group.name.clone()))?
        };
        self.metrics
            .group_members
            .with_label_values(&["chosen"])
            .inc();
        Ok(Member {
            client_id: chosen.clone(),
            carrying: self.group_load.enter(chosen),
        })
    }

    /// Whether `client_id` has a usable session here or, by the store, on another node.
    async fn is_online(&self, client_id: &str) -> bool {
        if self
            .local
            .of(client_id)
            .iter()
            .any(|s| s.transport.usable())
        {
            return true;
        }
        match self.registry.sessions(client_id).await {
            Ok(records) => !records.is_empty(),
            Err(e) => {
                tracing::warn!(client_id, error = %e, "cannot read the group member's sessions from the store; skipping it");
                false
            }
        }
    }
}
