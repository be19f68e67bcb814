//! Single-node mapping store: in memory, optionally persisted to a JSON file. Same semantics and
//! events as the Redis store; no network, no dependencies.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use super::nodes::NodeTable;
use super::persist::{self, Snapshot};
use super::types::new_epoch;
use super::{
    AccessDelta, AccessStats, ChangeEvent, ChangeOp, Changes, ListFilter, MappingStore, NodeRecord,
    NodeRegistry, Page, PageRequest, Position, Quota, QuotaScope, Rebuilt, StoreError,
    Subscription, SubscriptionEvent, source_group,
};
use crate::domain::{Hostname, Mapping, MappingId, MappingSpec};

/// Where and how often the memory store writes its JSON file.
#[derive(Debug, Clone)]
pub struct PersistOptions {
    pub path: PathBuf,
    /// Save in the background every `save_interval` when something changed.
    pub auto_save: bool,
    /// Zero saves synchronously after every change.
    pub save_interval: Duration,
}

struct State {
    /// Boxed: a `Mapping` is ~500 bytes, and B-tree nodes hold their values inline (half-full
    /// nodes kept twice that per mapping).
    by_id: BTreeMap<MappingId, Box<Mapping>>,
    by_domain: HashMap<Hostname, MappingId>,
    by_client: HashMap<String, BTreeSet<MappingId>>,
    by_user: HashMap<String, BTreeSet<MappingId>>,
    /// Mapping ids per source group (`source_group`), for quotas.
    by_group: HashMap<String, BTreeSet<MappingId>>,
    version: u64,
    /// The history this store continues: from its file, else new with the process.
    epoch: String,
    rebuilt: Option<Rebuilt>,
    changes: VecDeque<ChangeEvent>,
    dirty: bool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            by_id: BTreeMap::new(),
            by_domain: HashMap::new(),
            by_client: HashMap::new(),
            by_user: HashMap::new(),
            by_group: HashMap::new(),
            version: 0,
            epoch: new_epoch(),
            rebuilt: None,
            changes: VecDeque::new(),
            dirty: false,
        }
    }
}

impl State {
    fn index(&mut self, m: &Mapping) {
        self.by_domain
            .insert(m.full_domain.clone(), m.mapping_id.clone());
        if let Some(c) = &m.target_client_id {
            self.by_client
                .entry(c.clone())
                .or_default()
                .insert(m.mapping_id.clone());
        }
        if let Some(u) = &m.owner_user_id {
            self.by_user
                .entry(u.clone())
                .or_default()
                .insert(m.mapping_id.clone());
        }
        if let Some(g) = m.source.as_deref().and_then(source_group) {
            self.by_group
                .entry(g.to_string())
                .or_default()
                .insert(m.mapping_id.clone());
        }
    }

    fn unindex(&mut self, m: &Mapping) {
        if self.by_domain.get(&m.full_domain) == Some(&m.mapping_id) {
            self.by_domain.remove(&m.full_domain);
        }
        let group = m
            .source
            .as_deref()
            .and_then(source_group)
            .map(str::to_string);
        for (index, key) in [
            (&mut self.by_client, &m.target_client_id),
            (&mut self.by_user, &m.owner_user_id),
            (&mut self.by_group, &group),
        ] {
            if let Some(key) = key
                && let Some(set) = index.get_mut(key)
            {
                set.remove(&m.mapping_id);
                if set.is_empty() {
                    index.remove(key);
                }
            }
        }
    }

    /// The first quota `m` would exceed, checked under the same lock as the claim.
    fn over_quota(&self, m: &Mapping, quota: Quota) -> Result<(), StoreError> {
        let checks = [
            (
                m.source.as_deref().and_then(source_group).map(|g| {
                    (
                        QuotaScope::Group(g.to_string()),
                        self.by_group.get(g).map_or(0, BTreeSet::len),
                    )
                }),
                quota.per_group,
            ),
            (
                m.owner_user_id.as_ref().map(|u| {
                    (
                        QuotaScope::Owner(u.clone()),
                        self.by_user.get(u).map_or(0, BTreeSet::len),
                    )
                }),
                quota.per_owner,
            ),
        ];
        for (scope, limit) in checks {
            if let Some((scope, count)) = scope
                && limit > 0
                && count >= limit
            {
                return Err(StoreError::QuotaExceeded {
                    scope,
                    count: count as u64,
                    limit,
                });
            }
        }
        Ok(())
    }

    fn log(
        &mut self,
        max_len: usize,
        op: ChangeOp,
        m: &Mapping,
        previous_domain: Option<Hostname>,
        after: Option<u64>,
    ) -> ChangeEvent {
        let event = ChangeEvent {
            op,
            version: self.version,
            mapping_id: m.mapping_id.clone(),
            full_domain: m.full_domain.clone(),
            previous_domain,
            epoch: Some(self.epoch.clone()),
            after,
        };
        self.changes.push_back(event.clone());
        while self.changes.len() > max_len {
            self.changes.pop_front();
        }
        self.dirty = true;
        event
    }
}

struct Inner {
    state: RwLock<State>,
    events: broadcast::Sender<ChangeEvent>,
    persist: Option<PersistOptions>,
    /// Serialises snapshot-and-write, so an older snapshot never lands after a newer one.
    save_io: std::sync::Mutex<()>,
    changes_max_len: usize,
    subscription_buffer: usize,
    node_id: String,
    /// Apart from `state`: registrations are neither persisted nor versioned.
    nodes: std::sync::Mutex<NodeTable>,
    /// Tunnel sessions and credentials: neither persisted nor versioned.
    sessions: std::sync::Mutex<super::sessions::SessionTable>,
    /// ACME answers: neither persisted nor versioned.
    challenges: std::sync::Mutex<super::challenges::ChallengeTable>,
}

/// Single-node store. Cheap to clone; the last clone to go saves a pending change.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl MemoryStore {
    /// An empty store without persistence.
    pub fn new() -> Self {
        Self::build(State::default(), None, 100_000, 1000, String::new())
    }

    /// Opens the store from `persist.path` (empty when the file does not exist; an error naming
    /// the file when it cannot be read) and starts the background saver when configured.
    pub fn open(
        persist: Option<PersistOptions>,
        changes_max_len: usize,
        subscription_buffer: usize,
        node_id: &str,
    ) -> Result<Self, StoreError> {
        let mut state = State::default();
        if let Some(p) = &persist
            && let Some(snap) = persist::load(&p.path)?
        {
            state.version = snap.version;
            if let Some(epoch) = snap.epoch {
                state.epoch = epoch;
            }
            for m in snap.mappings {
                let bad = |detail: String| StoreError::Persist {
                    path: p.path.clone(),
                    detail,
                };
                if state.by_id.contains_key(&m.mapping_id) {
                    return Err(bad(format!("mapping {} appears twice", m.mapping_id)));
                }
                if let Some(other) = state.by_domain.get(&m.full_domain) {
                    return Err(bad(format!(
                        "{} is claimed by both {other} and {}",
                        m.full_domain, m.mapping_id
                    )));
                }
                state.index(&m);
                state.by_id.insert(m.mapping_id.clone(), m);
            }
            tracing::info!(file = %p.path.display(), mappings = state.by_id.len(), version = state.version, "loaded mappings");
        }
        let store = Self::build(
            state,
            persist,
            changes_max_len.max(1),
            subscription_buffer,
            node_id.to_string(),
        );
        if let Some(p) = &store.inner.persist
            && p.auto_save
            && !p.save_interval.is_zero()
        {
            tokio::spawn(saver(Arc::downgrade(&store.inner), p.save_interval));
        }
        Ok(store)
    }

    fn build(
        state: State,
        persist: Option<PersistOptions>,
        changes_max_len: usize,
        subscription_buffer: usize,
        node_id: String,
    ) -> Self {
        let (events, _) = broadcast::channel(subscription_buffer.max(16));
        Self {
            inner: Arc::new(Inner {
                state: RwLock::new(state),
                events,
                persist,
                save_io: std::sync::Mutex::new(()),
                changes_max_len,
                subscription_buffer,
                node_id,
                nodes: std::sync::Mutex::new(NodeTable::default()),
                sessions: std::sync::Mutex::new(super::sessions::SessionTable::default()),
                challenges: Default::default(),
            }),
        }
    }

    /// Writes the file now if anything changed since the last save.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.inner.save_if_dirty()
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<(T, ChangeEvent), StoreError>,
    ) -> Result<T, StoreError> {
        let (out, event) = {
            let mut state = self.inner.state.write().expect("store lock poisoned");
            f(&mut state)?
        };
        // No receivers is fine: nobody is subscribed.
        let _ = self.inner.events.send(event);
        self.save_if_synchronous();
        Ok(out)
    }

    /// With `save_interval` zero, writes the file now.
    fn save_if_synchronous(&self) {
        if let Some(p) = &self.inner.persist
            && p.auto_save
            && p.save_interval.is_zero()
        {
            // The change is applied (and published); a failed write stays pending and is
            // retried by the next change, flush or shutdown.
            if let Err(e) = self.inner.save_if_dirty() {
                tracing::error!(error = %e, "could not save mappings; will retry");
            }
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, super::sessions::SessionTable> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, NodeTable> {
        self.inner.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.inner.state.read().expect("store lock poisoned"))
    }

    fn delete_in(
        state: &mut State,
        max_len: usize,
        id: &MappingId,
        expected: Option<u64>,
    ) -> Result<(Mapping, ChangeEvent), StoreError> {
        let current = state
            .by_id
            .get(id)
            .ok_or_else(|| StoreError::NotFound { id: id.clone() })?;
        StoreError::check_version(id, expected, current.version)?;
        let removed = state.by_id.remove(id).expect("checked above");
        state.unindex(&removed);
        state.version += 1;
        let event = state.log(max_len, ChangeOp::Deleted, &removed, None, None);
        Ok((*removed, event))
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    fn save_if_dirty(&self) -> Result<(), StoreError> {
        let Some(p) = &self.persist else {
            return Ok(());
        };
        let _io = self.save_io.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = {
            let mut state = self.state.write().expect("store lock poisoned");
            if !state.dirty {
                return Ok(());
            }
            state.dirty = false;
            let snap = Snapshot::new(
                state.version,
                state.epoch.clone(),
                state.by_id.values().map(|m| &**m).collect(),
            );
            serde_json::to_vec(&snap).expect("mappings always serialise")
        };
        persist::write_atomic(&p.path, &bytes).inspect_err(|_| {
            // Keep the change pending so the next attempt writes it.
            self.state.write().expect("store lock poisoned").dirty = true;
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.save_if_dirty() {
            tracing::error!(error = %e, "could not save mappings on shutdown");
        }
    }
}

async fn saver(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = inner.save_if_dirty() {
            tracing::error!(error = %e, "could not save mappings; will retry");
        }
    }
}

impl MemoryStore {
    /// A create with the given id; `at`: restore at that version (see
    /// [`MappingStore::restore_within`]).
    fn create_as(
        &self,
        spec: MappingSpec,
        quota: Quota,
        id: MappingId,
        at: Option<u64>,
    ) -> Result<Mapping, StoreError> {
        let full = spec.validate()?;
        let now = Utc::now();
        let max_len = self.inner.changes_max_len;
        let mut mapping = Mapping::from_spec(id, spec, full.clone(), &self.inner.node_id, now);
        self.write(|state| {
            if let Some(holder_id) = state.by_domain.get(&full).cloned() {
                match state.by_id.get(&holder_id) {
                    Some(holder) if !holder.is_expired(now) => {
                        return Err(StoreError::DomainTaken {
                            domain: full.clone(),
                            holder: holder_id,
                            holder_source: holder.source.clone(),
                        });
                    }
                    // An expired holder releases its domain (FR-4.4).
                    Some(_) => {
                        let (_, released) = Self::delete_in(state, max_len, &holder_id, None)?;
                        let _ = self.inner.events.send(released);
                    }
                    // A claim without a record cannot stand in anyone's way.
                    None => {
                        state.by_domain.remove(&full);
                    }
                }
            }
            state.over_quota(&mapping, quota)?;
            if let Some(want) = at {
                // As the Redis script: only into a history being rebuilt, only ahead of the
                // store, only below the cap, and only with a free id.
                let marked = state
                    .rebuilt
                    .as_ref()
                    .is_some_and(|m| m.epoch == state.epoch);
                let actual = match state.by_id.get(&mapping.mapping_id) {
                    Some(existing) => Some(existing.version),
                    None => (want <= state.version || want > super::MAX_RESTORE_VERSION || marked)
                        .then_some(state.version),
                };
                if let Some(actual) = actual {
                    return Err(StoreError::VersionConflict {
                        id: mapping.mapping_id.clone(),
                        expected: want,
                        actual,
                    });
                }
            }
            // A restore ahead of the next version skips the ones between.
            let after = at
                .filter(|want| *want > state.version + 1)
                .map(|_| state.version);
            state.version = at.unwrap_or(state.version + 1);
            mapping.version = state.version;
            state.index(&mapping);
            state
                .by_id
                .insert(mapping.mapping_id.clone(), Box::new(mapping.clone()));
            let event = state.log(max_len, ChangeOp::Created, &mapping, None, after);
            Ok((mapping, event))
        })
    }
}

#[async_trait]
impl MappingStore for MemoryStore {
    async fn create_within(&self, spec: MappingSpec, quota: Quota) -> Result<Mapping, StoreError> {
        self.create_as(spec, quota, MappingId::generate(), None)
    }

    async fn restore_within(
        &self,
        spec: MappingSpec,
        quota: Quota,
        id: MappingId,
        version: u64,
    ) -> Result<Mapping, StoreError> {
        self.create_as(spec, quota, id, Some(version))
    }

    async fn update(
        &self,
        id: &MappingId,
        spec: MappingSpec,
        expected_version: u64,
    ) -> Result<Mapping, StoreError> {
        let full = spec.validate()?;
        let max_len = self.inner.changes_max_len;
        self.write(|state| {
            let current = state
                .by_id
                .get(id)
                .ok_or_else(|| StoreError::NotFound { id: id.clone() })?;
            StoreError::check_version(id, Some(expected_version), current.version)?;
            if let Some(holder) = state.by_domain.get(&full).filter(|h| *h != id) {
                return Err(StoreError::DomainTaken {
                    domain: full.clone(),
                    holder: holder.clone(),
                    holder_source: state.by_id.get(holder).and_then(|h| h.source.clone()),
                });
            }
            let current = current.clone();
            let mut next = current.with_spec(spec, full.clone(), Utc::now());
            state.unindex(&current);
            state.version += 1;
            next.version = state.version;
            state.index(&next);
            state.by_id.insert(id.clone(), Box::new(next.clone()));
            let moved = (current.full_domain != full).then_some(current.full_domain);
            let event = state.log(max_len, ChangeOp::Updated, &next, moved, None);
            Ok((next, event))
        })
    }

    async fn delete(
        &self,
        id: &MappingId,
        expected_version: Option<u64>,
    ) -> Result<Mapping, StoreError> {
        let max_len = self.inner.changes_max_len;
        self.write(|state| Self::delete_in(state, max_len, id, expected_version))
    }

    async fn get(&self, id: &MappingId) -> Result<Option<Mapping>, StoreError> {
        Ok(self.read(|s| s.by_id.get(id).map(|m| Mapping::clone(m))))
    }

    async fn get_by_domain(&self, domain: &Hostname) -> Result<Option<Mapping>, StoreError> {
        let now = Utc::now();
        Ok(self.read(|s| {
            s.by_domain
                .get(domain)
                .and_then(|id| s.by_id.get(id))
                .filter(|m| !m.is_expired(now))
                .map(|m| Mapping::clone(m))
        }))
    }

    async fn list(&self, filter: &ListFilter, page: PageRequest) -> Result<Page, StoreError> {
        use std::ops::Bound;
        let limit = page.limit.max(1);
        // Straight to the page (a scan from the first id made listing everything quadratic).
        let from = (
            page.after
                .as_ref()
                .map_or(Bound::Unbounded, Bound::Excluded),
            Bound::Unbounded,
        );
        Ok(self.read(|s| {
            let ids: Vec<&MappingId> = match filter {
                ListFilter::All => s.by_id.range(from).map(|(id, _)| id).take(limit).collect(),
                ListFilter::Client(c) => s
                    .by_client
                    .get(c)
                    .map(|set| set.range(from).take(limit).collect())
                    .unwrap_or_default(),
                ListFilter::User(u) => s
                    .by_user
                    .get(u)
                    .map(|set| set.range(from).take(limit).collect())
                    .unwrap_or_default(),
            };
            let next = (ids.len() == limit).then(|| ids[limit - 1].clone());
            Page {
                items: ids
                    .into_iter()
                    .filter_map(|id| s.by_id.get(id).map(|m| Mapping::clone(m)))
                    .collect(),
                next,
            }
        }))
    }

    async fn count(&self) -> Result<u64, StoreError> {
        Ok(self.read(|s| s.by_id.len() as u64))
    }

    async fn current_version(&self) -> Result<u64, StoreError> {
        Ok(self.read(|s| s.version))
    }

    async fn changes_since(&self, version: u64, limit: usize) -> Result<Changes, StoreError> {
        Ok(self.read(|s| {
            let events = s
                .changes
                .iter()
                .filter(|e| e.version > version)
                .take(limit.max(1))
                .cloned()
                .collect();
            Changes::decide(version, s.version, Some(s.epoch.clone()), events)
        }))
    }

    async fn position(&self) -> Result<Position, StoreError> {
        Ok(self.read(|s| Position {
            epoch: Some(s.epoch.clone()),
            version: s.version,
        }))
    }

    /// A memory store's history is its process's (or its file's): the epoch always exists.
    async fn ensure_epoch(&self) -> Result<String, StoreError> {
        Ok(self.read(|s| s.epoch.clone()))
    }

    /// One process holds the whole history: it never goes backwards.
    async fn note_backwards(&self, _seen: &Position) -> Result<Option<String>, StoreError> {
        Ok(Some(self.read(|s| s.epoch.clone())))
    }

    async fn rebuilt(&self) -> Result<Option<Rebuilt>, StoreError> {
        Ok(self.read(|s| s.rebuilt.clone()))
    }

    async fn mark_rebuilt(&self, epoch: &str, version: u64, by: &str) -> Result<bool, StoreError> {
        let mut state = self.inner.state.write().expect("store lock poisoned");
        if state.epoch != epoch {
            return Ok(false);
        }
        state.rebuilt = Some(Rebuilt {
            epoch: epoch.to_string(),
            version,
            at: Utc::now(),
            by: by.to_string(),
        });
        Ok(true)
    }

    async fn subscribe(&self) -> Result<Subscription, StoreError> {
        let (mut out, parts) = Subscription::channel(self.inner.subscription_buffer);
        let mut events = self.inner.events.subscribe();
        let task = tokio::spawn(async move {
            loop {
                let item = match events.recv().await {
                    Ok(event) => SubscriptionEvent::Change(event),
                    Err(broadcast::error::RecvError::Lagged(_)) => SubscriptionEvent::Lagged,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if !out.send(item) {
                    return;
                }
            }
        });
        Ok(Subscription::new(parts, task))
    }

    async fn release_expired(&self, now: DateTime<Utc>) -> Result<Vec<Mapping>, StoreError> {
        let due: Vec<(MappingId, u64)> = self.read(|s| {
            s.by_id
                .values()
                .filter(|m| m.is_expired(now))
                .map(|m| (m.mapping_id.clone(), m.version))
                .collect()
        });
        let mut released = Vec::with_capacity(due.len());
        for (id, version) in due {
            match self.delete(&id, Some(version)).await {
                Ok(m) => released.push(m),
                Err(StoreError::NotFound { .. } | StoreError::VersionConflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(released)
    }

    async fn record_access(&self, batch: &[AccessDelta]) -> Result<(), StoreError> {
        let applied = {
            let mut state = self.inner.state.write().expect("store lock poisoned");
            let mut applied = false;
            for d in batch {
                // Counters live in the record's statistics fields but are not a change of the
                // mapping: no version, no event. A deleted mapping's delta is dropped.
                if let Some(m) = state.by_id.get_mut(&d.mapping_id) {
                    let mut stats = AccessStats::of(m);
                    stats.add(d);
                    stats.store_in(m);
                    applied = true;
                }
            }
            state.dirty |= applied;
            applied
        };
        if applied {
            self.save_if_synchronous();
        }
        Ok(())
    }

    async fn access_stats(&self, id: &MappingId) -> Result<AccessStats, StoreError> {
        Ok(self.read(|s| {
            s.by_id
                .get(id)
                .map(|m| AccessStats::of(m))
                .unwrap_or_default()
        }))
    }
}

#[async_trait]
impl NodeRegistry for MemoryStore {
    async fn register_node(&self, node: &NodeRecord, ttl: Duration) -> Result<(), StoreError> {
        let now = std::time::Instant::now();
        // A TTL too large for the clock means "until removed", not a panic.
        let expires_at = now
            .checked_add(ttl)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        self.nodes().register(node, expires_at);
        Ok(())
    }

    async fn remove_node(&self, node_id: &str) -> Result<(), StoreError> {
        self.nodes().remove(node_id);
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        Ok(self.nodes().live(std::time::Instant::now()))
    }
}

#[async_trait]
impl super::TunnelRegistry for MemoryStore {
    async fn put_session(
        &self,
        client_id: &str,
        record: &super::SessionRecord,
        _ttl: Duration,
    ) -> Result<(), StoreError> {
        self.sessions().put(client_id, record, chrono::Utc::now());
        Ok(())
    }

    async fn refresh_session(
        &self,
        client_id: &str,
        record: &super::SessionRecord,
        _ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self
            .sessions()
            .refresh(client_id, record, chrono::Utc::now()))
    }

    async fn remove_session(
        &self,
        client_id: &str,
        record: &super::SessionRecord,
    ) -> Result<bool, StoreError> {
        Ok(self.sessions().remove(client_id, record))
    }

    async fn sessions(&self, client_id: &str) -> Result<Vec<super::SessionRecord>, StoreError> {
        Ok(self.sessions().live(client_id, chrono::Utc::now()))
    }

    async fn put_credential(
        &self,
        cred: &crate::tunnel::credential::ClientCredential,
    ) -> Result<(), StoreError> {
        self.sessions().put_credential(cred);
        Ok(())
    }

    async fn remove_credential(&self, client_id: &str) -> Result<(), StoreError> {
        self.sessions().remove_credential(client_id);
        Ok(())
    }

    async fn credential(
        &self,
        client_id: &str,
    ) -> Result<Option<crate::tunnel::credential::ClientCredential>, StoreError> {
        Ok(self.sessions().credential(client_id))
    }
}

#[async_trait]
impl super::ChallengeStore for MemoryStore {
    async fn put_challenge(
        &self,
        token: &str,
        key_authorization: &str,
        ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        super::challenges::check_put(token, key_authorization)?;
        self.inner.challenges.lock().unwrap().put(
            token,
            key_authorization,
            ttl,
            std::time::Instant::now(),
        );
        Ok(())
    }

    async fn challenge(&self, token: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .inner
            .challenges
            .lock()
            .unwrap()
            .get(token, std::time::Instant::now()))
    }

    async fn remove_challenge(&self, token: &str) -> Result<(), StoreError> {
        self.inner.challenges.lock().unwrap().remove(token);
        Ok(())
    }
}
