//! Which member of a load-balancing group carries an HTTP request: the members in the group's
//! order (round robin, or least requests in flight through this proxy), the first that has a
//! usable session on this node or, by the store, a live one on another. A member goes out of
//! the rotation as soon as its last session is gone (at most the heartbeat window after its
//! agent stops answering) and comes back with its next session. The request is then sent as to
//! a single client; a bodiless request that member could not take goes to the next one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::Tunnels;
use super::choose::reachable_elsewhere;
use super::spread::Carrying;
use crate::proxy::ProxyError;
use crate::proxy::route::GroupRoute;

/// How long what the store said of a member's sessions is taken as still true: a request to a
/// group of many offline members costs at most one store read per member per this interval.
const PRESENCE_TTL: Duration = Duration::from_secs(1);

/// Members whose presence is remembered; beyond this the stale entries are dropped.
const MAX_PRESENCE: usize = 4096;

/// The most members one request is sent to (a bodiless request another member may take after
/// one could not).
pub const MAX_MEMBER_TRIES: usize = 4;

/// The member chosen for one request, counted as in flight until dropped.
pub struct Member {
    pub client_id: String,
    pub carrying: Carrying<String>,
}

/// Whether members have a live session on another node, by the store, as last read.
#[derive(Default)]
pub(super) struct Presence {
    seen: Mutex<HashMap<String, (Instant, bool)>>,
}

impl Presence {
    fn get(&self, client_id: &str) -> Option<bool> {
        let seen = self.seen.lock().expect("not poisoned");
        seen.get(client_id)
            .filter(|(at, _)| at.elapsed() < PRESENCE_TTL)
            .map(|(_, online)| *online)
    }

    fn put(&self, client_id: &str, online: bool) {
        let mut seen = self.seen.lock().expect("not poisoned");
        if seen.len() >= MAX_PRESENCE {
            seen.retain(|_, (at, _)| at.elapsed() < PRESENCE_TTL);
        }
        if seen.len() < MAX_PRESENCE {
            seen.insert(client_id.to_string(), (Instant::now(), online));
        }
    }
}

impl Tunnels {
    /// Chooses the member of `group` a request goes to, passing over those in `tried`.
    /// `named`: the member another node chose (the `tunnox-client` header of a request a peer
    /// forwarded here, `from_peer`); such a request is served from this node's sessions only.
    pub async fn member(
        &self,
        group: &GroupRoute,
        named: Option<&str>,
        from_peer: bool,
        tried: &[String],
    ) -> Result<Member, ProxyError> {
        let chosen = if from_peer {
            // A peer's choice stands when it is a member; an older node that named none gets
            // the first member held here. Either way this node's turn does not move.
            match named {
                Some(c) => group.clients.iter().find(|m| *m == c),
                None => group
                    .clients
                    .iter()
                    .find(|c| self.local.of(c).iter().any(|s| s.transport.usable())),
            }
            .ok_or_else(|| ProxyError::NotHeldHere(named.unwrap_or(&group.name).to_string()))?
        } else {
            let order = self
                .group_load
                .order_of(group.balance, &group.turn, &group.clients);
            let mut found = None;
            for &i in &order {
                let c = &group.clients[i];
                if tried.contains(c) {
                    continue;
                }
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

    /// A member could not take a request although it looked online (e.g. the records of a node
    /// that died outlive it): it is passed over for [`PRESENCE_TTL`] unless a session of it
    /// is here.
    pub fn member_failed(&self, client_id: &str) {
        self.presence.put(client_id, false);
        self.metrics
            .group_members
            .with_label_values(&["next_after_failure"])
            .inc();
    }

    /// Whether `client_id` has a usable session here or, by the store (read at most once per
    /// [`PRESENCE_TTL`]), a live one another node can be sent requests for.
    async fn is_online(&self, client_id: &str) -> bool {
        if self
            .local
            .of(client_id)
            .iter()
            .any(|s| s.transport.usable())
        {
            return true;
        }
        if let Some(online) = self.presence.get(client_id) {
            return online;
        }
        let online = match self.registry.sessions(client_id).await {
            Ok(records) => {
                let now = Utc::now();
                records
                    .iter()
                    .any(|r| reachable_elsewhere(r, &self.node_id, now))
            }
            Err(e) => {
                tracing::warn!(client_id, error = %e, "cannot read the group member's sessions from the store; skipping it");
                false
            }
        };
        self.presence.put(client_id, online);
        online
    }
}
