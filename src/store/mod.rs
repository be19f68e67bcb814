//! The mapping store: the contract between the control plane and the data plane.
//!
//! Two implementations with the same semantics: [`RedisStore`] (multi-node, the contract in
//! `docs/redis-schema.md`) and [`MemoryStore`] (single-node, optional JSON-file persistence).
//! Both pass one conformance suite (`tests/store_conformance.rs`).

mod backoff;
mod challenges;
mod error;
mod follow;
mod keys;
mod memory;
mod nodes;
pub(crate) mod persist;
mod ports;
mod quota;
mod redis;
mod sessions;
mod stats;
mod types;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::{Hostname, Mapping, MappingId, MappingSpec};

pub use backoff::{Backoff, RETRY_FIRST, RETRY_MAX, jitter};
pub use challenges::{CHALLENGE_PATH, ChallengeStore, is_token};
pub use error::StoreError;
pub use follow::Break;
pub use follow::{Follower, Step, SyncUpdate, VersionTracker};
pub use keys::Keys;
pub use memory::{MemoryStore, PersistOptions};
pub use nodes::{Applied, NodeRecord, NodeRegistry, NodeState, healthy_sets};
pub use ports::{PortClaim, PortOutcome, PortRegistry, PortRequest, PortTable, PortTraffic};
pub use quota::{Quota, QuotaScope, source_group};
pub use redis::{RedisOptions, RedisStore, RedisTls, SentinelOptions};
pub use sessions::{SessionRecord, SessionState, TunnelRegistry};
pub use stats::{AccessDelta, AccessStats};
pub use types::{
    ChangeEvent, ChangeOp, Changes, ListFilter, Lookup, Page, PageRequest, Position, Rebuilt,
    Subscription, SubscriptionEvent,
};

/// The highest version a record can be restored at (exact as a Lua number; a resource's status
/// is not trusted to stay below it).
pub const MAX_RESTORE_VERSION: u64 = 1 << 52;

/// Everything the control plane and the data plane need from shared routing state.
///
/// Versions: every mutation increments one store-wide counter; the new value is both the
/// record's `version` (its compare-and-set token) and the version of the change event.
#[async_trait]
pub trait MappingStore: Send + Sync + 'static {
    /// Claims `spec`'s domain and writes a new record. Fails with [`StoreError::DomainTaken`]
    /// naming the holder when the domain is claimed (an expired holder is released first).
    async fn create(&self, spec: MappingSpec) -> Result<Mapping, StoreError> {
        self.create_within(spec, Quota::UNLIMITED).await
    }

    /// [`MappingStore::create`], counted against `quota` in the same atomic step as the claim:
    /// fails with [`StoreError::QuotaExceeded`] when the record's source group or owner already
    /// holds that many records, so concurrent creators never exceed it. The claim is checked
    /// first (a taken domain is `DomainTaken` whatever the counts).
    async fn create_within(&self, spec: MappingSpec, quota: Quota) -> Result<Mapping, StoreError>;

    /// [`MappingStore::create_within`] for a record the store lost (a flushed or replaced
    /// Redis), written again with the id and the version its resource's status names, so that
    /// the status stays true without a write. Only into a history being rebuilt (no rebuilt
    /// marker at the current epoch), only while the store has not reached `version` (the change
    /// log stays in version order), only up to [`MAX_RESTORE_VERSION`], and only with an id no
    /// record or index names; otherwise [`StoreError::VersionConflict`] with the store's
    /// version (or that record's), and the caller creates the record anew.
    async fn restore_within(
        &self,
        spec: MappingSpec,
        quota: Quota,
        id: MappingId,
        version: u64,
    ) -> Result<Mapping, StoreError>;

    /// Replaces the spec of mapping `id` if its version is still `expected_version`
    /// (compare-and-set); moves the claim when the domain changes.
    async fn update(
        &self,
        id: &MappingId,
        spec: MappingSpec,
        expected_version: u64,
    ) -> Result<Mapping, StoreError>;

    /// Deletes mapping `id` and releases its domain; with `expected_version`, only if unchanged.
    async fn delete(
        &self,
        id: &MappingId,
        expected_version: Option<u64>,
    ) -> Result<Mapping, StoreError>;

    async fn get(&self, id: &MappingId) -> Result<Option<Mapping>, StoreError>;

    /// The live mapping for `domain`; an expired mapping is treated as absent.
    async fn get_by_domain(&self, domain: &Hostname) -> Result<Option<Mapping>, StoreError>;

    /// One page of mappings in id (creation) order.
    async fn list(&self, filter: &ListFilter, page: PageRequest) -> Result<Page, StoreError>;

    /// Every mapping, in pages of at most `limit` in id order, sent into `pages` (a warm-up: the
    /// caller takes each page as it comes, so the whole store is never held at once). A page
    /// may be shorter, or empty (records deleted meanwhile, or the end). Ends early, without
    /// error, when the receiver is gone. This default reads one page after another; a store
    /// across the network reads ahead (`RedisStore`).
    async fn read_all(
        &self,
        limit: usize,
        pages: tokio::sync::mpsc::Sender<Vec<Mapping>>,
    ) -> Result<(), StoreError> {
        let mut after = None;
        loop {
            let page = self
                .list(&ListFilter::All, PageRequest { after, limit })
                .await?;
            if pages.send(page.items).await.is_err() {
                return Ok(());
            }
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// True when `domain` could be claimed now.
    async fn is_available(&self, domain: &Hostname) -> Result<bool, StoreError> {
        Ok(self.get_by_domain(domain).await?.is_none())
    }

    /// `get_by_domain` together with the store's position (one round trip on Redis), so a
    /// reader can tell "no such host" from "the store lost its history".
    async fn lookup(&self, domain: &Hostname) -> Result<Lookup, StoreError> {
        let mapping = self.get_by_domain(domain).await?;
        Ok(Lookup {
            mapping,
            position: self.position().await?,
        })
    }

    /// How many records the store holds (expired ones not yet released included).
    async fn count(&self) -> Result<u64, StoreError>;

    async fn current_version(&self) -> Result<u64, StoreError>;

    /// The store's epoch and version, read together.
    async fn position(&self) -> Result<Position, StoreError>;

    /// The store's epoch, created now if the store has none (after a flush, before any write).
    async fn ensure_epoch(&self) -> Result<String, StoreError>;

    /// Tells the store that this reader saw `seen` and now finds the store below it at the same
    /// epoch: the history went backwards, so the epoch is replaced for everyone. Returns the
    /// store's epoch afterwards.
    async fn note_backwards(&self, seen: &Position) -> Result<Option<String>, StoreError>;

    /// The controller's last "rebuilt at epoch E" marker.
    async fn rebuilt(&self) -> Result<Option<Rebuilt>, StoreError>;

    /// Writes the marker "every mapping the controller owns is in the store at `epoch`, as
    /// listed at `version`" — only if the store is still at `epoch` (returns false otherwise).
    async fn mark_rebuilt(&self, epoch: &str, version: u64, by: &str) -> Result<bool, StoreError>;

    /// Up to `limit` change events with a version above `version`, in order; or
    /// [`Changes::Trimmed`] when the log no longer reaches back that far (reload fully).
    async fn changes_since(&self, version: u64, limit: usize) -> Result<Changes, StoreError>;

    /// A live feed of change events. At-most-once: it reports reconnects and lag so the
    /// subscriber can catch up with [`MappingStore::changes_since`] (see [`Follower`]).
    async fn subscribe(&self) -> Result<Subscription, StoreError>;

    /// Deletes every mapping whose `expires_at` is at or before `now` (seed FR-4.4) and returns
    /// them; their domains become claimable.
    async fn release_expired(&self, now: DateTime<Utc>) -> Result<Vec<Mapping>, StoreError>;

    /// Adds a batch of counters (one round trip on Redis). Deltas for mappings that no longer
    /// exist are dropped. Never changes a record's version and never emits a change event.
    async fn record_access(&self, batch: &[AccessDelta]) -> Result<(), StoreError>;

    /// The accumulated counters of mapping `id` (zeros when none were recorded).
    async fn access_stats(&self, id: &MappingId) -> Result<AccessStats, StoreError>;

    /// Reads every mapping, page by page.
    async fn list_all(&self) -> Result<Vec<Mapping>, StoreError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .list(&ListFilter::All, PageRequest { after, limit: 1000 })
                .await?;
            out.extend(page.items);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(out),
            }
        }
    }
}

/// Which store a process uses, as decided by the configuration.
// Built once per process: the size of the Redis variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum StoreBackend {
    Redis(RedisOptions),
    Memory {
        persist: Option<PersistOptions>,
        changes_max_len: usize,
        subscription_buffer: usize,
        node_id: String,
    },
}

/// Every part of one store, over one connection.
#[derive(Clone)]
pub struct Stores {
    pub mappings: std::sync::Arc<dyn MappingStore>,
    pub nodes: std::sync::Arc<dyn NodeRegistry>,
    pub sessions: std::sync::Arc<dyn TunnelRegistry>,
    /// Redis only: the remote ports of tunnels, claimed by the controller.
    pub ports: Option<std::sync::Arc<dyn PortRegistry>>,
    pub challenges: std::sync::Arc<dyn ChallengeStore>,
}

/// Opens the configured store with all its parts.
pub async fn open_all(backend: StoreBackend) -> Result<Stores, StoreError> {
    Ok(match backend {
        StoreBackend::Redis(opts) => {
            let s = std::sync::Arc::new(RedisStore::connect(opts).await?);
            Stores {
                mappings: s.clone(),
                nodes: s.clone(),
                sessions: s.clone(),
                ports: Some(s.clone()),
                challenges: s,
            }
        }
        StoreBackend::Memory {
            persist,
            changes_max_len,
            subscription_buffer,
            node_id,
        } => {
            let s = std::sync::Arc::new(MemoryStore::open(
                persist,
                changes_max_len,
                subscription_buffer,
                &node_id,
            )?);
            Stores {
                mappings: s.clone(),
                nodes: s.clone(),
                sessions: s.clone(),
                ports: None,
                challenges: s,
            }
        }
    })
}
