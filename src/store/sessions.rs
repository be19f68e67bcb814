//! Where tunnel sessions and agent credentials live (ARCHITECTURE §4, docs/redis-schema.md):
//!
//! - `tunnox:client:{id}:session`: a hash, one field per session named `instance/slot`
//!   ([`SessionRecord::key`]), each a JSON [`SessionRecord`] with its own expiry; the key's TTL is
//!   refreshed by every heartbeat. A reconnect of the same agent session (same instance and slot)
//!   overwrites its stale field at once; replicas of one client (other instances) and an agent's
//!   other sessions (other slots) coexist.
//! - `tunnox:tunnel:client:{id}:auth`: the client's [`ClientCredential`] (a token hash).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::tunnel::credential::ClientCredential;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Takes new streams.
    #[default]
    Active,
    /// Its agent has a replacement or its proxy is draining: streams in flight finish, new ones
    /// go elsewhere when there is an elsewhere.
    Leaving,
}

/// One live session of a client, as the proxy holding it registered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub session_id: String,
    /// The proxy node holding the session.
    pub node_id: String,
    /// Where other proxies forward a request for this client (the holder's HTTP listener, as
    /// it advertises it in the node registry).
    pub node_address: String,
    /// The agent process (random per start) and which of its sessions this is.
    pub instance: String,
    pub slot: u32,
    pub since: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// After this the record is ignored, whatever the key's TTL says.
    pub expires_at: DateTime<Utc>,
    #[serde(default)]
    pub state: SessionState,
    /// The configuration the agent acknowledged on this session: hash and refused tunnels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<crate::tunnel::config::ConfigAck>,
    /// Tunnels (names) whose health check fails on the agent of this session.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unhealthy: Vec<String>,
}

impl SessionRecord {
    /// The hash field: one per agent session, whichever proxy holds it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.instance, self.slot)
    }

    pub fn live_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at > now
    }
}

#[async_trait]
pub trait TunnelRegistry: Send + Sync + 'static {
    /// Writes `record` under its key (replacing that key's previous session at once), drops
    /// expired fields, and keeps the client's hash for at least `ttl`.
    async fn put_session(
        &self,
        client_id: &str,
        record: &SessionRecord,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// [`TunnelRegistry::put_session`] only while `record`'s field is free or still names
    /// `record.session_id`: a session's heartbeat or state change never writes itself back over
    /// a newer session of the same agent slot. False when superseded (nothing written).
    async fn refresh_session(
        &self,
        client_id: &str,
        record: &SessionRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Removes `record`'s field only while it still names `record.session_id` (a session
    /// closing never removes the replacement that took its key). True when removed.
    async fn remove_session(
        &self,
        client_id: &str,
        record: &SessionRecord,
    ) -> Result<bool, StoreError>;

    /// The client's live sessions (expired records are not returned), by key.
    async fn sessions(&self, client_id: &str) -> Result<Vec<SessionRecord>, StoreError>;

    /// Writes (replaces) a client's credential.
    async fn put_credential(&self, cred: &ClientCredential) -> Result<(), StoreError>;

    async fn remove_credential(&self, client_id: &str) -> Result<(), StoreError>;

    async fn credential(&self, client_id: &str) -> Result<Option<ClientCredential>, StoreError>;

    /// Tells whoever follows [`TunnelRegistry::session_events`] that `client_id`'s sessions
    /// changed (one opened or ended). Best effort: a lost announcement is caught up by the
    /// controller's periodic resync.
    async fn announce_session(&self, _client_id: &str) {}

    /// Client ids whose sessions changed, as announced by any proxy, for as long as the
    /// receiver lives (resubscribing after a lost connection); `None` where the store has no
    /// such feed (single-node).
    fn session_events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<String>> {
        None
    }
}

/// The memory store's registry (single-node): nothing persisted.
#[derive(Debug, Default)]
pub(crate) struct SessionTable {
    sessions: HashMap<String, HashMap<String, SessionRecord>>,
    credentials: HashMap<String, ClientCredential>,
}

impl SessionTable {
    pub fn put(&mut self, client_id: &str, record: &SessionRecord, now: DateTime<Utc>) {
        let fields = self.sessions.entry(client_id.to_string()).or_default();
        fields.retain(|_, r| r.live_at(now));
        fields.insert(record.key(), record.clone());
    }

    /// [`Self::put`] unless the field names another session; false then.
    pub fn refresh(&mut self, client_id: &str, record: &SessionRecord, now: DateTime<Utc>) -> bool {
        let superseded = self
            .sessions
            .get(client_id)
            .and_then(|f| f.get(&record.key()))
            .is_some_and(|r| r.session_id != record.session_id);
        if !superseded {
            self.put(client_id, record, now);
        }
        !superseded
    }

    pub fn remove(&mut self, client_id: &str, record: &SessionRecord) -> bool {
        let Some(fields) = self.sessions.get_mut(client_id) else {
            return false;
        };
        let key = record.key();
        let removed = fields
            .get(&key)
            .is_some_and(|r| r.session_id == record.session_id);
        if removed {
            fields.remove(&key);
        }
        if fields.is_empty() {
            self.sessions.remove(client_id);
        }
        removed
    }

    pub fn live(&self, client_id: &str, now: DateTime<Utc>) -> Vec<SessionRecord> {
        let mut out: Vec<SessionRecord> = self
            .sessions
            .get(client_id)
            .map(|f| f.values().filter(|r| r.live_at(now)).cloned().collect())
            .unwrap_or_default();
        out.sort_by_key(SessionRecord::key);
        out
    }

    pub fn put_credential(&mut self, cred: &ClientCredential) {
        self.credentials
            .insert(cred.client_id.clone(), cred.clone());
    }

    pub fn remove_credential(&mut self, client_id: &str) {
        self.credentials.remove(client_id);
    }

    pub fn credential(&self, client_id: &str) -> Option<ClientCredential> {
        self.credentials.get(client_id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(id: &str, instance: &str, slot: u32, expires_in_s: i64) -> SessionRecord {
        let now = Utc::now();
        SessionRecord {
            session_id: id.into(),
            node_id: "n1".into(),
            node_address: "127.0.0.1:8080".into(),
            instance: instance.into(),
            slot,
            since: now,
            last_seen: now,
            expires_at: now + chrono::Duration::seconds(expires_in_s),
            state: SessionState::Active,
            config: None,
            unhealthy: Vec::new(),
        }
    }

    #[test]
    fn a_reconnect_replaces_its_own_session_and_an_old_close_keeps_the_new_one() {
        let mut t = SessionTable::default();
        let now = Utc::now();
        let old = record("s1", "i1", 0, 15);
        t.put("laptop", &old, now);
        let new = record("s2", "i1", 0, 15);
        t.put("laptop", &new, now);
        let replica = record("s3", "i2", 0, 15);
        t.put("laptop", &replica, now);
        let ids = |t: &SessionTable| -> Vec<String> {
            t.live("laptop", now)
                .into_iter()
                .map(|r| r.session_id)
                .collect()
        };
        assert_eq!(ids(&t), ["s2", "s3"]);
        assert!(
            !t.remove("laptop", &old),
            "the old session's close keeps s2"
        );
        assert_eq!(ids(&t), ["s2", "s3"]);
        assert!(t.remove("laptop", &new));
        assert_eq!(ids(&t), ["s3"]);
        let stale = record("s4", "i3", 0, -1);
        t.put("laptop", &stale, now);
        assert_eq!(ids(&t), ["s3"], "expired records are not live");
    }
}
