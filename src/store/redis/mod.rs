//! Redis implementation of the mapping store: every mutation is one Lua script (claim, record,
//! indexes, version, change log, publish), so concurrent writers on any node stay consistent.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::AsyncCommands;

mod challenges;
mod connect;
mod epoch;
mod feed;
mod link;
mod nodes;
mod ports;
mod scripts;
mod sessions;
mod stats;

pub use connect::{RedisOptions, RedisTls, SentinelOptions};
use link::{Conn, Link};
use scripts::{ScriptReply, Scripts, expiry_arg, flag, parse_entry};

use super::{
    AccessDelta, AccessStats, Changes, Keys, ListFilter, Lookup, MappingStore, Page, PageRequest,
    Position, Quota, QuotaScope, Rebuilt, StoreError, Subscription, source_group,
};
use crate::domain::{Hostname, Mapping, MappingId, MappingSpec};

/// Multi-node mapping store on Redis. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The connections, to the configured server or the master the sentinels name.
    link: Link,
    keys: Keys,
    scripts: Scripts,
    opts: RedisOptions,
    /// The furthest position this client has seen (replies and reads): a store found below it
    /// at the same epoch went backwards (see `epoch.rs`).
    seen: std::sync::Mutex<Position>,
}

impl RedisStore {
    /// Connects the pool (fails fast when Redis or every sentinel is unreachable, or the
    /// password is wrong).
    pub async fn connect(opts: RedisOptions) -> Result<Self, StoreError> {
        let link = Link::connect(opts.clone()).await?;
        let keys = Keys::new(
            &opts.root_prefix,
            &opts.prefix,
            opts.events_channel.as_deref(),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                link,
                keys,
                scripts: Scripts::new(),
                opts,
                seen: std::sync::Mutex::new(Position::default()),
            }),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    fn conn(&self) -> Conn {
        self.inner.link.conn()
    }

    /// Up to `limit` ids of `index` after `after` (the first page when `None`), in id order.
    async fn page_ids(
        &self,
        index: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let start = match after {
            Some(after) => format!("({after}"),
            None => "-".to_string(),
        };
        Ok(redis::cmd("ZRANGE")
            .arg(index)
            .arg(start)
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await?)
    }

    /// The records of `ids` still there, in their order.
    async fn records(&self, ids: Vec<String>) -> Result<Vec<Mapping>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = self.inner.keys.prefix();
        let keys: Vec<String> = ids
            .iter()
            .map(|id| format!("{prefix}:mapping:{id}"))
            .collect();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn())
            .await?;
        let mut items = Vec::with_capacity(values.len());
        for (key, json) in keys.iter().zip(values) {
            // A record deleted between the two reads is simply not listed; an unreadable one is
            // reported and skipped, so one bad record cannot stall every reader.
            match json.map(|j| self.decode(key, &j)) {
                Some(Ok(m)) => items.push(m),
                Some(Err(e)) => tracing::error!(error = %e, "skipping unreadable mapping record"),
                None => {}
            }
        }
        Ok(items)
    }

    fn decode(&self, at: &str, json: &str) -> Result<Mapping, StoreError> {
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
            at: at.to_string(),
            detail: e.to_string(),
        })
    }

    /// The record as JSON without its `version` (the script appends the new one).
    fn encode(mapping: &Mapping) -> Result<String, StoreError> {
        let mut value = serde_json::to_value(mapping).map_err(|e| StoreError::Corrupt {
            at: mapping.mapping_id.to_string(),
            detail: e.to_string(),
        })?;
        if let Some(obj) = value.as_object_mut() {
            obj.remove("version");
        }
        Ok(value.to_string())
    }

    async fn holder_error(&self, domain: Hostname, holder: String) -> StoreError {
        let holder = match MappingId::parse(&holder) {
            Ok(id) => id,
            Err(e) => {
                return StoreError::Corrupt {
                    at: self.inner.keys.domain(&domain),
                    detail: e.to_string(),
                };
            }
        };
        let holder_source = self
            .get(&holder)
            .await
            .ok()
            .flatten()
            .and_then(|m| m.source);
        StoreError::DomainTaken {
            domain,
            holder,
            holder_source,
        }
    }

    /// A create with the given id; `at`: restore at that version (see
    /// [`MappingStore::restore_within`]).
    async fn create_as(
        &self,
        spec: MappingSpec,
        quota: Quota,
        id: MappingId,
        at: Option<u64>,
    ) -> Result<Mapping, StoreError> {
        let full = spec.validate()?;
        let mut mapping =
            Mapping::from_spec(id, spec, full.clone(), &self.inner.opts.node_id, Utc::now());
        // One retry: the first conflict may be an expired holder, released here (FR-4.4).
        let mut retried = false;
        loop {
            match self.try_create(&mapping, quota, at).await? {
                Ok(v) => {
                    mapping.version = v;
                    return Ok(mapping);
                }
                Err(holder) => {
                    let err = self.holder_error(full.clone(), holder).await;
                    if retried || !self.release_if_expired(&err).await? {
                        return Err(err);
                    }
                    retried = true;
                }
            }
        }
    }

    /// Runs the create script: `Ok(Ok(version))`, `Ok(Err(holder))` when the domain is taken.
    /// `at`: restore at that version (see [`MappingStore::restore_within`]).
    async fn try_create(
        &self,
        mapping: &Mapping,
        quota: Quota,
        at: Option<u64>,
    ) -> Result<Result<u64, String>, StoreError> {
        let k = &self.inner.keys;
        let id = mapping.mapping_id.as_str();
        let mut inv = self.inner.scripts.create.prepare_invoke();
        inv.key(k.version())
            .key(k.changes())
            .key(k.domain(&mapping.full_domain))
            .key(k.mapping(&mapping.mapping_id))
            .key(k.all())
            .key(k.expiry());
        if let Some(c) = &mapping.target_client_id {
            inv.key(k.client(c));
        }
        if let Some(u) = &mapping.owner_user_id {
            inv.key(k.user(u));
        }
        let group = mapping.source.as_deref().and_then(source_group);
        if let Some(g) = group {
            inv.key(k.group(g));
        }
        if at.is_some() {
            inv.key(k.rebuilt());
        }
        inv.arg(id)
            .arg(Self::encode(mapping)?)
            .arg(mapping.full_domain.as_str())
            .arg(k.events())
            .arg(self.inner.opts.changes_max_len)
            .arg(expiry_arg(mapping))
            .arg(flag(mapping.target_client_id.is_some()))
            .arg(flag(mapping.owner_user_id.is_some()))
            .arg(flag(group.is_some()))
            .arg(quota.per_group)
            .arg(quota.per_owner)
            .arg(format!("{}:mapping:", k.prefix()))
            .arg(at.map(|v| v.to_string()).unwrap_or_default());
        self.epoch_args(&mut inv);
        let mut conn = self.conn();
        match self.mutation_reply(inv.invoke_async(&mut conn).await?)? {
            ScriptReply::Stale(actual) if at.is_some() => Err(StoreError::VersionConflict {
                id: mapping.mapping_id.clone(),
                expected: at.unwrap_or_default(),
                actual,
            }),
            ScriptReply::Ok(v) => {
                if let Err(e) = conn.replicated().await {
                    // Not acknowledged: take it back, so that no retry or reader adopts a
                    // record the next failover may lose.
                    if let Err(undo) = self.delete_once(&mapping.mapping_id, Some(v)).await
                        && !matches!(undo, StoreError::Unreplicated { .. })
                    {
                        tracing::warn!(error = %undo, id = %mapping.mapping_id, "cannot take back an unreplicated create");
                    }
                    return Err(e);
                }
                Ok(Ok(v))
            }
            ScriptReply::Taken(holder) => Ok(Err(holder)),
            ScriptReply::Quota { owner, count } => {
                let (scope, limit) = match (owner, group) {
                    (false, Some(g)) => (QuotaScope::Group(g.to_string()), quota.per_group),
                    _ => (
                        QuotaScope::Owner(mapping.owner_user_id.clone().unwrap_or_default()),
                        quota.per_owner,
                    ),
                };
                Err(StoreError::QuotaExceeded {
                    scope,
                    count,
                    limit,
                })
            }
            other => Err(other.unexpected("create")),
        }
    }
}

#[async_trait]
impl MappingStore for RedisStore {
    async fn create_within(&self, spec: MappingSpec, quota: Quota) -> Result<Mapping, StoreError> {
        self.create_as(spec, quota, MappingId::generate(), None)
            .await
    }

    async fn restore_within(
        &self,
        spec: MappingSpec,
        quota: Quota,
        id: MappingId,
        version: u64,
    ) -> Result<Mapping, StoreError> {
        self.create_as(spec, quota, id, Some(version)).await
    }

    async fn update(
        &self,
        id: &MappingId,
        spec: MappingSpec,
        expected_version: u64,
    ) -> Result<Mapping, StoreError> {
        let full = spec.validate()?;
        let current = self
            .get_raw(id)
            .await?
            .ok_or_else(|| StoreError::NotFound { id: id.clone() })?;
        StoreError::check_version(id, Some(expected_version), current.version)?;
        let mut next = current.with_spec(spec, full.clone(), Utc::now());
        let k = &self.inner.keys;
        let mut inv = self.inner.scripts.update.prepare_invoke();
        inv.key(k.version())
            .key(k.changes())
            .key(k.mapping(id))
            .key(k.domain(&current.full_domain))
            .key(k.domain(&full))
            .key(k.expiry());
        let mut flags = String::new();
        for key in [
            current.target_client_id.as_deref().map(|c| k.client(c)),
            next.target_client_id.as_deref().map(|c| k.client(c)),
            current.owner_user_id.as_deref().map(|u| k.user(u)),
            next.owner_user_id.as_deref().map(|u| k.user(u)),
            current
                .source
                .as_deref()
                .and_then(source_group)
                .map(|g| k.group(g)),
            next.source
                .as_deref()
                .and_then(source_group)
                .map(|g| k.group(g)),
        ] {
            flags.push_str(flag(key.is_some()));
            if let Some(key) = key {
                inv.key(key);
            }
        }
        inv.arg(id.as_str())
            .arg(expected_version)
            .arg(Self::encode(&next)?)
            .arg(full.as_str())
            .arg(current.full_domain.as_str())
            .arg(k.events())
            .arg(self.inner.opts.changes_max_len)
            .arg(expiry_arg(&next))
            .arg(flags);
        self.epoch_args(&mut inv);
        let mut conn = self.conn();
        match self.mutation_reply(inv.invoke_async(&mut conn).await?)? {
            ScriptReply::Ok(v) => {
                conn.replicated().await?;
                next.version = v;
                Ok(next)
            }
            ScriptReply::Taken(holder) => Err(self.holder_error(full, holder).await),
            ScriptReply::Stale(actual) => Err(StoreError::VersionConflict {
                id: id.clone(),
                expected: expected_version,
                actual,
            }),
            ScriptReply::Missing => Err(StoreError::NotFound { id: id.clone() }),
            other => Err(other.unexpected("update")),
        }
    }

    async fn delete(
        &self,
        id: &MappingId,
        expected_version: Option<u64>,
    ) -> Result<Mapping, StoreError> {
        // Without an expected version a concurrent update is no reason to fail: try again.
        let mut attempts = 0;
        loop {
            match self.delete_once(id, expected_version).await {
                Err(StoreError::VersionConflict { .. })
                    if expected_version.is_none() && attempts < 10 =>
                {
                    attempts += 1;
                }
                other => return other,
            }
        }
    }

    async fn get(&self, id: &MappingId) -> Result<Option<Mapping>, StoreError> {
        Ok(self.get_raw(id).await?)
    }

    async fn get_by_domain(&self, domain: &Hostname) -> Result<Option<Mapping>, StoreError> {
        Ok(self.lookup(domain).await?.mapping)
    }

    async fn lookup(&self, domain: &Hostname) -> Result<Lookup, StoreError> {
        self.lookup_at(domain).await
    }

    async fn position(&self) -> Result<Position, StoreError> {
        self.read_position().await
    }

    async fn ensure_epoch(&self) -> Result<String, StoreError> {
        self.ensure_epoch_now().await
    }

    async fn note_backwards(&self, seen: &Position) -> Result<Option<String>, StoreError> {
        self.check_backwards(seen).await
    }

    async fn rebuilt(&self) -> Result<Option<Rebuilt>, StoreError> {
        self.read_rebuilt().await
    }

    async fn mark_rebuilt(&self, epoch: &str, version: u64, by: &str) -> Result<bool, StoreError> {
        self.write_rebuilt(epoch, version, by).await
    }

    async fn list(&self, filter: &ListFilter, page: PageRequest) -> Result<Page, StoreError> {
        let k = &self.inner.keys;
        let index = match filter {
            ListFilter::All => k.all(),
            ListFilter::Client(c) => k.client(c),
            ListFilter::User(u) => k.user(u),
        };
        let limit = page.limit.max(1);
        let ids = self
            .page_ids(&index, page.after.as_ref().map(MappingId::as_str), limit)
            .await?;
        let next = match ids.last() {
            Some(last) if ids.len() == limit => {
                Some(MappingId::parse(last).map_err(|e| StoreError::Corrupt {
                    at: index.clone(),
                    detail: e.to_string(),
                })?)
            }
            _ => None,
        };
        let items = self.records(ids).await?;
        Ok(Page { items, next })
    }

    /// Reads ahead: the ids of the next pages are asked for while earlier pages' records are
    /// still on their way or being decoded, so Redis and this process work at once (issue:
    /// scale; the warm-up of a million mappings waited on Redis for half its time).
    async fn read_all(
        &self,
        limit: usize,
        pages: tokio::sync::mpsc::Sender<Vec<Mapping>>,
    ) -> Result<(), StoreError> {
        use futures::StreamExt;
        /// Pages asked for and not yet handed over.
        const AHEAD: usize = 3;
        let index = self.inner.keys.all();
        let limit = limit.max(1);
        let mut after: Option<String> = None;
        let mut more = true;
        let mut reading = futures::stream::FuturesOrdered::new();
        loop {
            while more && reading.len() < AHEAD {
                let ids = self.page_ids(&index, after.as_deref(), limit).await?;
                more = ids.len() == limit;
                after = ids.last().cloned();
                if !ids.is_empty() {
                    reading.push_back(self.records(ids));
                }
            }
            let Some(page) = reading.next().await else {
                return Ok(());
            };
            if pages.send(page?).await.is_err() {
                return Ok(());
            }
        }
    }

    async fn count(&self) -> Result<u64, StoreError> {
        Ok(self.conn().zcard(self.inner.keys.all()).await?)
    }

    async fn current_version(&self) -> Result<u64, StoreError> {
        let v: Option<u64> = self.conn().get(self.inner.keys.version()).await?;
        Ok(v.unwrap_or(0))
    }

    async fn changes_since(&self, version: u64, limit: usize) -> Result<Changes, StoreError> {
        let k = &self.inner.keys;
        type Entries = Vec<(String, Vec<(String, String)>)>;
        let (current, epoch, entries): (Option<u64>, Option<String>, Entries) = redis::pipe()
            .atomic()
            .get(k.version())
            .get(k.epoch())
            .cmd("XRANGE")
            .arg(k.changes())
            .arg(format!("0-{}", version + 1))
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut self.conn())
            .await?;
        let current = current.unwrap_or(0);
        let mut events = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            events.push(
                parse_entry(&id, &fields).ok_or_else(|| StoreError::Corrupt {
                    at: format!("{} {id}", k.changes()),
                    detail: format!("malformed change entry {fields:?}"),
                })?,
            );
        }
        self.saw(epoch.as_deref(), current);
        Ok(Changes::decide(version, current, epoch, events))
    }

    async fn subscribe(&self) -> Result<Subscription, StoreError> {
        let (out, parts) = Subscription::channel(self.inner.opts.subscription_buffer);
        // Subscribe once before returning, so events after this call are not missed.
        let mut moved = self.inner.link.moved();
        let first = self.open_pubsub(&mut moved).await?;
        let store = self.clone();
        let task = tokio::spawn(async move { store.feed(first, moved, out).await });
        Ok(Subscription::new(parts, task))
    }

    async fn release_expired(&self, now: DateTime<Utc>) -> Result<Vec<Mapping>, StoreError> {
        let ids: Vec<String> = self
            .conn()
            .zrangebyscore(self.inner.keys.expiry(), "-inf", now.timestamp_millis())
            .await?;
        let mut released = Vec::new();
        for raw in ids {
            let Ok(id) = MappingId::parse(&raw) else {
                continue;
            };
            let Some(m) = self.get_raw(&id).await? else {
                continue;
            };
            if !m.is_expired(now) {
                continue;
            }
            match self.delete(&id, Some(m.version)).await {
                Ok(m) => released.push(m),
                // Renewed or removed by someone else meanwhile: theirs is the newer word.
                Err(StoreError::NotFound { .. } | StoreError::VersionConflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(released)
    }

    async fn record_access(&self, batch: &[AccessDelta]) -> Result<(), StoreError> {
        self.record_access_batch(batch).await
    }

    async fn access_stats(&self, id: &MappingId) -> Result<AccessStats, StoreError> {
        self.read_access_stats(id).await
    }
}

impl RedisStore {
    async fn delete_once(
        &self,
        id: &MappingId,
        expected_version: Option<u64>,
    ) -> Result<Mapping, StoreError> {
        let current = self
            .get_raw(id)
            .await?
            .ok_or_else(|| StoreError::NotFound { id: id.clone() })?;
        StoreError::check_version(id, expected_version, current.version)?;
        let k = &self.inner.keys;
        let mut inv = self.inner.scripts.delete.prepare_invoke();
        inv.key(k.version())
            .key(k.changes())
            .key(k.mapping(id))
            .key(k.domain(&current.full_domain))
            .key(k.all())
            .key(k.expiry())
            .key(k.stats(id));
        if let Some(c) = &current.target_client_id {
            inv.key(k.client(c));
        }
        if let Some(u) = &current.owner_user_id {
            inv.key(k.user(u));
        }
        let group = current.source.as_deref().and_then(source_group);
        if let Some(g) = group {
            inv.key(k.group(g));
        }
        inv.arg(id.as_str())
            .arg(current.version)
            .arg(current.full_domain.as_str())
            .arg(k.events())
            .arg(self.inner.opts.changes_max_len)
            .arg(flag(current.target_client_id.is_some()))
            .arg(flag(current.owner_user_id.is_some()))
            .arg(flag(group.is_some()));
        self.epoch_args(&mut inv);
        let mut conn = self.conn();
        match self.mutation_reply(inv.invoke_async(&mut conn).await?)? {
            ScriptReply::Ok(_) => {
                conn.replicated().await?;
                Ok(current)
            }
            ScriptReply::Stale(actual) => Err(StoreError::VersionConflict {
                id: id.clone(),
                expected: expected_version.unwrap_or(current.version),
                actual,
            }),
            ScriptReply::Missing => Err(StoreError::NotFound { id: id.clone() }),
            other => Err(other.unexpected("delete")),
        }
    }

    /// After a conflict: true when the holder is gone or was expired and has been released,
    /// so the claim is worth retrying.
    async fn release_if_expired(&self, conflict: &StoreError) -> Result<bool, StoreError> {
        let StoreError::DomainTaken { holder, .. } = conflict else {
            return Ok(false);
        };
        match self.get_raw(holder).await? {
            None => {
                let domain = match conflict {
                    StoreError::DomainTaken { domain, .. } => domain,
                    _ => return Ok(false),
                };
                let _: i64 = self
                    .inner
                    .scripts
                    .release_dangling
                    .key(self.inner.keys.domain(domain))
                    .key(self.inner.keys.mapping(holder))
                    .key(self.inner.keys.stats(holder))
                    .arg(holder.as_str())
                    .invoke_async(&mut self.conn())
                    .await?;
                Ok(true)
            }
            Some(h) if h.is_expired(Utc::now()) => {
                match self.delete(&h.mapping_id, Some(h.version)).await {
                    Ok(_) | Err(StoreError::NotFound { .. }) => Ok(true),
                    Err(StoreError::VersionConflict { .. }) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(_) => Ok(false),
        }
    }

    async fn get_raw(&self, id: &MappingId) -> Result<Option<Mapping>, StoreError> {
        let key = self.inner.keys.mapping(id);
        let json: Option<String> = self.conn().get(&key).await?;
        json.map(|j| self.decode(&key, &j)).transpose()
    }
}
